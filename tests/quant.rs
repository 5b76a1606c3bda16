//! Quantised frozen weights: NF4 as bitsandbytes stores and dequantises it, checked live
//! (`scripts/check_nf4.py`). Plain NF4 is bit-exact (codes, absmax, fp32 and bf16 values);
//! with double quantisation the 8-bit code table and the absmax codes are exact, and the offset
//! (the absmax values' mean, which torch sums in its own order) is exact or one unit in the last
//! place off.

mod common;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{python_with, repo_root};
use kiln::ops::quant::{
    dynamic_map, Nf4, Nf4Scales, QuantFormat, Quantization, QuantizedWeight, NF4_BLOCK,
};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn nf4_equals_bitsandbytes_bit_for_bit_and_double_quantisation_to_the_last_bit_of_its_offset() {
    let Some(python) = python_with("bitsandbytes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A partial last block (600 values), and enough blocks for two double-quantisation blocks.
    for (case, shape) in [("odd", [6usize, 100]), ("wide", [128, 256])] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let normal = Normal::new(0.0f32, 0.02).unwrap();
        let mut w: Vec<f32> = (0..shape[0] * shape[1])
            .map(|_| normal.sample(&mut rng))
            .collect();
        w[3] = 0.31; // an outlier, as real weights have
        w[70] = 0.0;
        let input = dir.path().join(format!("{case}.safetensors"));
        let output = dir.path().join(format!("{case}-bnb.safetensors"));
        let tensor = Tensor::from_vec(w.clone(), (shape[0], shape[1]), &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("w".to_string(), tensor)]), &input)
            .unwrap();
        let status = Command::new(&python)
            .args([
                repo_root().join("scripts/check_nf4.py").to_str().unwrap(),
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let bnb = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
        let bnb_u8 =
            |name: &str| -> Vec<u8> { bnb[name].flatten_all().unwrap().to_vec1().unwrap() };
        let code2 = vec_f32(&bnb["double.code2"]);
        assert_eq!(bits(&dynamic_map()), bits(&code2), "the dynamic 8-bit code");
        for double in [false, true] {
            let name = if double { "double" } else { "plain" };
            let ours = Nf4::quantize(&w, &shape, NF4_BLOCK, double);
            let mut exact_offset = true;
            assert_eq!(
                ours.packed,
                bnb_u8(&format!("{name}.packed")),
                "{case} {name}: packed codes"
            );
            match &ours.scales {
                Nf4Scales::Fp32(absmax) => {
                    assert_eq!(
                        bits(absmax),
                        bits(&vec_f32(&bnb["plain.absmax"])),
                        "{case}: absmax"
                    );
                }
                Nf4Scales::Double {
                    quantized,
                    absmax,
                    offset,
                } => {
                    // The offset is the absmax values' mean, which torch sums in its own order:
                    // equal to the last bit or one unit in the last place off.
                    let theirs = vec_f32(&bnb["double.offset"])[0];
                    assert!(
                        offset.to_bits().abs_diff(theirs.to_bits()) <= 1,
                        "{case}: offset {offset} vs {theirs}"
                    );
                    exact_offset = offset.to_bits() == theirs.to_bits();
                    assert_eq!(
                        *quantized,
                        bnb_u8("double.absmax_codes"),
                        "{case}: 8-bit absmax codes"
                    );
                    let theirs = vec_f32(&bnb["double.absmax2"]);
                    for (a, b) in absmax.iter().zip(&theirs) {
                        assert!(
                            (a - b).abs() <= 2.0 * f32::EPSILON * b.abs(),
                            "{case}: absmax of the absmax {a} vs {b}"
                        );
                    }
                }
            }
            let dequantized = ours.dequantize();
            let theirs = vec_f32(&bnb[&format!("{name}.dequantized")]);
            match exact_offset {
                true => assert_eq!(
                    bits(&dequantized),
                    bits(&theirs),
                    "{case} {name}: dequantize_4bit in fp32"
                ),
                false => {
                    let worst = (dequantized.iter().zip(&theirs))
                        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
                        .fold(0f32, f32::max);
                    assert!(
                        worst <= 1e-6,
                        "{case} {name}: dequantize_4bit differs by {worst:e} relative"
                    );
                    eprintln!("{case} {name}: offset one ulp off torch's mean; values within {worst:.1e} relative");
                }
            }
            // From bf16 weights to bf16 values, as a bf16 base is quantised.
            let w_bf16 = vec_f32(
                &Tensor::from_vec(w.clone(), w.len(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            );
            let from_bf16 = Nf4::quantize(&w_bf16, &shape, NF4_BLOCK, double).dequantize();
            let as_bf16 = vec_f32(
                &Tensor::from_vec(from_bf16, w.len(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            );
            let theirs_bf16 = vec_f32(&bnb[&format!("{name}.bf16")]);
            let differing = (as_bf16.iter().zip(&theirs_bf16))
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            match double {
                false => assert_eq!(differing, 0, "{case} {name}: dequantize_4bit in bf16"),
                // One ulp of the offset can round a value to the neighbouring bf16.
                true => assert!(
                    differing * 1000 <= w.len(),
                    "{case} {name}: {differing} bf16 values differ"
                ),
            }
            let error = w
                .iter()
                .zip(&dequantized)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!(
                "{case} {name}: {} bytes for {} values; largest error {error:.2e}",
                ours.bytes(),
                w.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantised models: inference, training, interop.

/// `kiln init --preset PRESET` with the bundled tokenizer into `dir`.
fn init_preset(dir: &std::path::Path, preset: &str) {
    let (ok, _, stderr) = common::kiln(&[
        "init",
        "--preset",
        preset,
        "--out",
        dir.to_str().unwrap(),
        "--seed",
        "5",
        "--tokenizer",
        &common::bundled("tokenizer"),
    ]);
    assert!(ok, "{stderr}");
}

/// A few rows of token ids as `kiln score` reads them.
fn write_ids(path: &std::path::Path) {
    let rows: Vec<String> = (0..3)
        .map(|r| {
            let ids: Vec<u32> = (0..12).map(|i| (i * 37 + r * 101 + 5) % 1000).collect();
            serde_json::json!({ "ids": ids }).to_string()
        })
        .collect();
    std::fs::write(path, rows.join("\n") + "\n").unwrap();
}

/// `kiln score` of `ids` with `args`, each row's per-token log-probabilities.
fn kiln_score(
    model: &std::path::Path,
    ids: &std::path::Path,
    args: &[&str],
    ops: &str,
) -> Vec<Vec<f64>> {
    let out = ids.with_extension(format!(
        "{}.out",
        std::process::id() as u64 ^ rand::random::<u32>() as u64
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["score", "--model", model.to_str().unwrap()])
        .args([
            "--input",
            ids.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .args(args)
        .env("KILN_OPS", ops)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    read_logprobs(&out)
}

fn read_logprobs(path: &std::path::Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            (row["logprobs"].as_array().unwrap().iter())
                .filter_map(|v| v.as_f64())
                .collect()
        })
        .collect()
}

fn worst_difference(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "rows");
    (a.iter().zip(b))
        .flat_map(|(x, y)| {
            // `kiln score` may give the first token no log-probability; align on the last ones.
            let n = x.len().min(y.len());
            assert!(n > 0);
            x[x.len() - n..]
                .iter()
                .zip(&y[y.len() - n..])
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f64::max)
}

/// `dir`'s model with every block linear weight replaced by its quantised values, dequantised.
fn write_dequantized(dir: &std::path::Path, out: &std::path::Path, quantization: Quantization) {
    let config = kiln::model::load_config(dir).unwrap();
    let mut params = kiln::model::load_parameters(dir, &config, DType::F32, &Device::Cpu).unwrap();
    for (name, conv1d) in kiln::model::quantized::quantized_weights(&config) {
        let w = &params[&name];
        let matrix = if conv1d {
            w.t().unwrap().contiguous().unwrap()
        } else {
            w.clone()
        };
        let back = QuantizedWeight::quantize(&matrix, quantization)
            .unwrap()
            .dequantize(DType::F32)
            .unwrap();
        let back = if conv1d {
            back.t().unwrap().contiguous().unwrap()
        } else {
            back
        };
        params.insert(name, back);
    }
    kiln::model::save_model(
        out,
        &config,
        &params,
        DType::F32,
        kiln::model::DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        if dir.join(file).is_file() {
            std::fs::copy(dir.join(file), out.join(file)).unwrap();
        }
    }
}

#[test]
fn quantised_models_compute_with_their_dequantised_weights_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids.jsonl");
    write_ids(&ids);
    // GPT-J (nn.Linear layers) and GPT-2 (Conv1D, stored [in, out]).
    for preset in ["tiny", "gpt2-tiny"] {
        let model = dir.path().join(preset);
        init_preset(&model, preset);
        let original = kiln_score(&model, &ids, &[], "fused");
        for (args, quantization) in [
            (
                &["--quantize", "nf4"][..],
                Quantization {
                    format: QuantFormat::Nf4,
                    double_quant: false,
                },
            ),
            (
                &["--quantize", "nf4", "--double-quant"][..],
                Quantization {
                    format: QuantFormat::Nf4,
                    double_quant: true,
                },
            ),
            (
                &["--quantize", "int8"][..],
                Quantization {
                    format: QuantFormat::Int8,
                    double_quant: false,
                },
            ),
        ] {
            let dequantized = dir.path().join(format!(
                "{preset}-{}-{}",
                quantization.format, quantization.double_quant
            ));
            write_dequantized(&model, &dequantized, quantization);
            let reference = kiln_score(&dequantized, &ids, &[], "fused");
            let fused = kiln_score(&model, &ids, args, "fused");
            let generic = kiln_score(&model, &ids, args, "generic");
            let (to_dense, to_generic, to_original) = (
                worst_difference(&fused, &reference),
                worst_difference(&generic, &reference),
                worst_difference(&fused, &original),
            );
            eprintln!(
                "{preset} {args:?}: vs the dequantised fp32 model {to_dense:.1e} (generic path \
                 {to_generic:.1e}); vs the original weights {to_original:.1e}"
            );
            assert!(to_dense <= 1e-4 && to_generic <= 1e-4, "{preset} {args:?}");
            // Greedy decoding (the KV cache, the few-row products) picks the same tokens.
            let generate = |model: &std::path::Path, extra: &[&str]| {
                let (ok, stdout, stderr) = common::kiln(
                    &[
                        &["generate", "--model", model.to_str().unwrap()][..],
                        &[
                            "--prompt",
                            "mnli hypothesis: a cat",
                            "--max-new-tokens",
                            "12",
                        ],
                        extra,
                    ]
                    .concat(),
                );
                assert!(ok, "{stderr}");
                stdout
            };
            assert_eq!(
                generate(&model, args),
                generate(&dequantized, &[]),
                "{preset} {args:?}"
            );
            assert!(
                to_original > 1e-4,
                "{preset} {args:?}: nothing was quantised"
            );
            // bf16 compute rounds the dequantised values as bitsandbytes' bf16 dequantisation does.
            let bf16 = kiln_score(
                &model,
                &ids,
                &[args, &["--dtype", "bf16"]].concat(),
                "fused",
            );
            let bf16_reference = kiln_score(&dequantized, &ids, &["--dtype", "bf16"], "fused");
            let gap = worst_difference(&bf16, &bf16_reference);
            eprintln!("{preset} {args:?} bf16: vs the dequantised model in bf16 {gap:.1e}");
            assert!(gap <= 2e-3, "{preset} {args:?} bf16: {gap:e}");
        }
    }
}

#[test]
fn quantisation_options_are_checked_where_they_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    init_preset(&model, "tiny");
    let ids = dir.path().join("ids.jsonl");
    write_ids(&ids);
    let out = dir.path().join("out.jsonl");
    let (ok, _, stderr) = common::kiln(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        ids.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--quantize",
        "int8",
        "--double-quant",
    ]);
    assert!(
        !ok && stderr.contains("--double-quant applies to --quantize nf4 only"),
        "{stderr}"
    );
    let (ok, _, stderr) = common::kiln(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        ids.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--quantize",
        "nf3",
    ]);
    assert!(
        !ok && stderr.contains("unknown quantisation \"nf3\""),
        "{stderr}"
    );
    for (set, expected) in [
        (
            "model.quantize=nf4",
            "model.quantize: nf4 stores the frozen weights of a LoRA run",
        ),
        (
            "model.double_quant=true",
            "model.double_quant: applies to model.quantize: nf4 only",
        ),
    ] {
        let recipe = common::write_recipe(dir.path(), "");
        let (ok, _, stderr) =
            common::kiln(&["recipe", "check", recipe.to_str().unwrap(), "--set", set]);
        assert!(!ok && stderr.contains(expected), "{set}: {stderr}");
    }
    let recipe = common::write_recipe(dir.path(), "lora: {r: 4, alpha: 8}\n");
    let (ok, _, stderr) = common::kiln(&[
        "recipe",
        "check",
        recipe.to_str().unwrap(),
        "--set",
        "model.quantize=int4",
    ]);
    assert!(!ok && stderr.contains("model.quantize"), "{stderr}");
}

/// The recipe of `common::write_recipe` as a QLoRA run: LoRA on an NF4 base.
fn qlora_recipe(out: &std::path::Path, double_quant: bool) -> std::path::PathBuf {
    let path = common::write_recipe(
        out,
        "lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n",
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}",
        &format!(
            "model: {{init: {{preset: tiny, seed: 1, vocab_size: 1024}}, quantize: nf4, \
             double_quant: {double_quant}}}"
        ),
    );
    assert!(text.contains("quantize: nf4"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn qlora_trains_an_adapter_resumes_bit_exactly_and_estimates_its_base_in_four_bits() {
    let whole = tempfile::tempdir().unwrap();
    let recipe = qlora_recipe(whole.path(), true);
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let last = whole.path().join("checkpoints/run/step-10");
    assert!(
        last.join("adapter_config.json").is_file()
            && last.join("adapter_model.safetensors").is_file()
    );
    assert!(
        !last.join("model.safetensors").exists(),
        "an adapter checkpoint holds no base"
    );

    let killed = tempfile::tempdir().unwrap();
    let recipe_killed = qlora_recipe(killed.path(), true);
    common::train_and_kill_after_step_4(killed.path(), &recipe_killed);
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe_killed.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
        "--resume",
        "latest",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let resumed = killed
        .path()
        .join("checkpoints/run/step-10/adapter_model.safetensors");
    assert_eq!(
        std::fs::read(last.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(resumed).unwrap(),
        "a QLoRA run resumed after kill -9 ends with the same adapter, bit for bit"
    );

    // The estimate holds the block layers in 4 bits: below the bf16 base's.
    let estimate = |recipe: &std::path::Path, sets: &[&str]| -> f64 {
        let mut args = vec!["recipe", "check", recipe.to_str().unwrap()];
        for set in sets {
            args.extend(["--set", set]);
        }
        let (ok, stdout, stderr) = common::kiln(&args);
        assert!(ok, "{stderr}");
        let resolved: serde_json::Value = serde_norway::from_str(&stdout).unwrap();
        resolved["derived"]["memory_estimate"]["weights"]
            .as_f64()
            .unwrap_or_else(|| panic!("{stdout}"))
    };
    let nf4 = estimate(&recipe, &["precision.compute=bf16"]);
    let bf16 = estimate(
        &recipe,
        &[
            "precision.compute=bf16",
            "model.quantize=null",
            "model.double_quant=false",
        ],
    );
    assert!(nf4 < bf16, "nf4 weights {nf4} vs bf16 {bf16}");
}

/// `scripts/check_qlora.py score` of `ids`: per-token log-probabilities by transformers, PEFT
/// and bitsandbytes.
fn peft_score(
    python: &str,
    base: &std::path::Path,
    ids: &std::path::Path,
    args: &[&str],
) -> Vec<Vec<f64>> {
    let out = ids.with_extension(format!("peft{}.out", rand::random::<u32>()));
    let status = Command::new(python)
        .arg(repo_root().join("scripts/check_qlora.py"))
        .args([
            "score",
            base.to_str().unwrap(),
            ids.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    read_logprobs(&out)
}

#[test]
fn qlora_adapters_move_between_kiln_and_peft_with_bitsandbytes() {
    let Some(python) = python_with("bitsandbytes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    init_preset(&base, "tiny");
    let ids = dir.path().join("ids.jsonl");
    write_ids(&ids);

    // Kiln's QLoRA adapter, used as QLoRA adapters are: on the bf16/fp32 base, and on the base
    // quantised by bitsandbytes.
    let recipe = common::write_recipe(
        dir.path(),
        "lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n",
    );
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}",
        &format!("model: {{from: {}, quantize: nf4}}", base.display()),
    );
    std::fs::write(&recipe, text).unwrap();
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let adapter = dir.path().join("checkpoints/run/step-10");
    let adapter_arg = adapter.to_str().unwrap();
    let kiln_dense = kiln_score(&base, &ids, &["--adapter", adapter_arg], "fused");
    let peft_dense = peft_score(&python, &base, &ids, &["--adapter", adapter_arg]);
    let dense_gap = worst_difference(&kiln_dense, &peft_dense);
    let kiln_nf4 = kiln_score(
        &base,
        &ids,
        &["--adapter", adapter_arg, "--quantize", "nf4"],
        "fused",
    );
    let peft_nf4 = peft_score(
        &python,
        &base,
        &ids,
        &["--adapter", adapter_arg, "--quantize", "nf4"],
    );
    let nf4_gap = worst_difference(&kiln_nf4, &peft_nf4);
    let bnb_forward = peft_score(
        &python,
        &base,
        &ids,
        &[
            "--adapter",
            adapter_arg,
            "--quantize",
            "nf4",
            "--bnb-forward",
        ],
    );
    let bnb_gap = worst_difference(&kiln_nf4, &bnb_forward);
    let base_only = kiln_score(&base, &ids, &["--quantize", "nf4"], "fused");
    eprintln!(
        "Kiln's QLoRA adapter in PEFT: on the fp32 base {dense_gap:.1e}, on bitsandbytes' NF4 \
         weights {nf4_gap:.1e} (through bitsandbytes' own CPU 4-bit product {bnb_gap:.1e}); the \
         adapter moves the log-probabilities by {:.1e}",
        worst_difference(&kiln_nf4, &base_only)
    );
    assert!(dense_gap <= 1e-4 && nf4_gap <= 1e-4);
    // `kiln merge` merges a QLoRA adapter into the unquantised base.
    let merged = dir.path().join("merged");
    let (ok, _, stderr) = common::kiln(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter_arg,
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let merged_gap = worst_difference(&kiln_score(&merged, &ids, &[], "fused"), &kiln_dense);
    assert!(merged_gap <= 1e-5, "merged {merged_gap:e}");
    assert!(bnb_gap <= 1e-2, "{bnb_gap:e}");
    assert!(
        worst_difference(&kiln_nf4, &base_only) > 1e-3,
        "the adapter changed nothing"
    );

    // PEFT + bitsandbytes' QLoRA adapter in Kiln, on Kiln's NF4 base.
    let peft_adapter = dir.path().join("peft-adapter");
    let status = Command::new(&python)
        .arg(repo_root().join("scripts/check_qlora.py"))
        .args([
            "train",
            base.to_str().unwrap(),
            ids.to_str().unwrap(),
            peft_adapter.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let peft_arg = peft_adapter.to_str().unwrap();
    let theirs = peft_score(
        &python,
        &base,
        &ids,
        &["--adapter", peft_arg, "--quantize", "nf4"],
    );
    let ours = kiln_score(
        &base,
        &ids,
        &["--adapter", peft_arg, "--quantize", "nf4"],
        "fused",
    );
    let gap = worst_difference(&ours, &theirs);
    eprintln!("PEFT's QLoRA adapter in Kiln on NF4: {gap:.1e}");
    assert!(gap <= 1e-4, "{gap:e}");
    assert!(
        worst_difference(&ours, &base_only) > 1e-3,
        "PEFT's adapter changed nothing"
    );
}

#[test]
fn a_partial_fine_tune_on_a_quantised_base_checkpoints_the_weights_it_computed_with() {
    let run = |out: &std::path::Path| -> std::path::PathBuf {
        let recipe = common::write_recipe(
            out,
            "train: {trainable: [transformer.h.1, \"transformer.ln_*\"]}\n",
        );
        let text = std::fs::read_to_string(&recipe).unwrap().replace(
            "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}",
            "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}, quantize: int8}",
        );
        std::fs::write(&recipe, text).unwrap();
        recipe
    };
    let whole = tempfile::tempdir().unwrap();
    let recipe = run(whole.path());
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);
    assert!(ok, "{stdout}{stderr}");
    let last = whole.path().join("checkpoints/run/step-10");
    let saved = common::load_tensors(&last.join("model.safetensors"));

    // Frozen block 0 holds its int8 values dequantised; the trained block 1 is its masters.
    let base = whole.path().join("base");
    let (ok, _, stderr) = common::kiln(&[
        "init",
        "--preset",
        "tiny",
        "--seed",
        "1",
        "--vocab-size",
        "1024",
        "--out",
        base.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let initial = common::load_tensors(&base.join("model.safetensors"));
    let int8 = Quantization {
        format: QuantFormat::Int8,
        double_quant: false,
    };
    for frozen in [
        "transformer.h.0.attn.q_proj.weight",
        "transformer.h.0.mlp.fc_out.weight",
    ] {
        let expected = QuantizedWeight::quantize(&initial[frozen], int8)
            .unwrap()
            .dequantize(DType::F32)
            .unwrap();
        assert_eq!(
            common::max_abs_diff(&saved[frozen], &expected),
            0.0,
            "{frozen}: its int8 values"
        );
        assert!(common::max_abs_diff(&saved[frozen], &initial[frozen]) > 0.0);
    }
    let trained = "transformer.h.1.attn.q_proj.weight";
    assert!(
        common::max_abs_diff(&saved[trained], &initial[trained]) > 1e-4,
        "{trained} trained"
    );
    // The head and the embedding are not quantised: still the initial values.
    assert_eq!(
        common::max_abs_diff(&saved["lm_head.weight"], &initial["lm_head.weight"]),
        0.0
    );
    assert!(
        saved.keys().all(|k| !QuantizedWeight::is_part(k)),
        "no quantised parts in a HF checkpoint"
    );

    let killed = tempfile::tempdir().unwrap();
    let recipe_killed = run(killed.path());
    common::train_and_kill_after_step_4(killed.path(), &recipe_killed);
    let (ok, stdout, stderr) = common::kiln(&[
        "train",
        recipe_killed.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
        "--resume",
        "latest",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        std::fs::read(last.join("model.safetensors")).unwrap(),
        std::fs::read(
            killed
                .path()
                .join("checkpoints/run/step-10/model.safetensors")
        )
        .unwrap(),
        "resumed after kill -9: the same weights, bit for bit"
    );
}
