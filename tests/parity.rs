//! Kiln's GPT-J against HF transformers' `GPTJForCausalLM`, on fixtures written by
//! `scripts/make_fixtures.py` (random models saved by HF itself, with HF's logits, loss and
//! gradients). No Python is needed to run these.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use kiln::model::{self, gptj, Batch};

const CONFIGS: &[&str] = &["rot8", "full12"];

fn fixture_batch(io: &HashMap<String, Tensor>) -> (Vec<Vec<u32>>, Batch) {
    let rows = rows_from_fixture(&io["input_ids"], &io["attention_mask"]);
    let batch = Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    (rows, batch)
}

#[test]
fn fp32_logits_match_transformers() {
    for name in CONFIGS {
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io.safetensors"));
        let model = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let (rows, batch) = fixture_batch(&io);
        let logits = model.forward(&batch, None).unwrap();
        let reference = &io["logits"];
        let mut worst = 0f32;
        for (r, row) in rows.iter().enumerate() {
            let ours = logits.get(r).unwrap().narrow(0, 0, row.len()).unwrap();
            let theirs = reference.get(r).unwrap().narrow(0, 0, row.len()).unwrap();
            worst = worst.max(max_abs_diff(&ours, &theirs));
        }
        eprintln!("{name}: fp32 logits max abs diff {worst:e}");
        assert!(worst <= 1e-4, "{name}: logits differ by {worst}");
    }
}

#[test]
fn padded_rows_match_rows_alone() {
    for name in CONFIGS {
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io.safetensors"));
        let model = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let (rows, batch) = fixture_batch(&io);
        let padded = model.forward(&batch, None).unwrap();
        let alone_batch = Batch::right_padded(&rows[1..2], 0, &Device::Cpu).unwrap();
        let alone = model.forward(&alone_batch, None).unwrap().get(0).unwrap();
        let in_batch = padded.get(1).unwrap().narrow(0, 0, rows[1].len()).unwrap();
        let diff = max_abs_diff(&in_batch, &alone);
        assert!(
            diff <= 1e-5,
            "{name}: padded row differs from the row alone by {diff}"
        );
        let hf_alone = &io["logits_row1_alone"];
        let diff = max_abs_diff(&alone, hf_alone);
        assert!(diff <= 1e-4, "{name}: row alone differs from HF by {diff}");
    }
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    for name in CONFIGS {
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io.safetensors"));
        let config = model::load_config(&dir).unwrap();
        let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
        let vars: HashMap<String, Var> = params
            .iter()
            .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
            .collect();
        let tensors = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let model =
            model::model_from_parameters(&config, &tensors, DType::F32, &Device::Cpu).unwrap();
        let (rows, batch) = fixture_batch(&io);
        let seq = rows.iter().map(Vec::len).max().unwrap();
        let logits = model.forward(&batch, None).unwrap();
        let labels = gptj::shifted_labels(&rows, seq);
        let loss = gptj::causal_lm_loss(&logits, &labels).unwrap();
        let ours = loss.to_scalar::<f32>().unwrap();
        let theirs = io["loss"].to_vec1::<f32>().unwrap()[0];
        eprintln!("{name}: loss {ours} vs {theirs}");
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{name}: loss {ours} vs HF {theirs}"
        );

        let grads = loss.backward().unwrap();
        let mut checked = 0;
        let mut worst = (0f32, String::new());
        for (param, var) in &vars {
            let reference = io
                .get(&format!("grad.{param}"))
                .unwrap_or_else(|| panic!("fixture has no gradient for {param}"));
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {param}"));
            let err = relative_error(grad, reference);
            if err > worst.0 {
                worst = (err, param.clone());
            }
            checked += 1;
        }
        eprintln!(
            "{name}: {checked} gradients, worst relative error {:e} ({})",
            worst.0, worst.1
        );
        assert_eq!(checked, model::parameter_shapes(&config).len());
        assert!(
            worst.0 <= 1e-4,
            "{name}: gradient of {} off by {}",
            worst.1,
            worst.0
        );
    }
}

/// Half-precision forward passes against the fp32 reference. The tolerances are the documented
/// ones (README, "Precision"): the logits of these random models span roughly +-1, and half
/// precision keeps 11 (fp16) or 8 (bf16) significant bits through 2-3 layers of matmuls.
#[test]
fn half_precision_forward_is_close_to_fp32_reference() {
    for (dtype, tolerance) in [(DType::F16, 3e-3f32), (DType::BF16, 2e-2)] {
        for name in CONFIGS {
            let dir = fixtures().join("parity").join(name);
            let io = load_tensors(&dir.join("io.safetensors"));
            let model = model::load_model(&dir, dtype, &Device::Cpu).unwrap();
            let (rows, batch) = fixture_batch(&io);
            let logits = model.forward(&batch, None).unwrap();
            assert_eq!(logits.dtype(), DType::F32, "logits come back in fp32");
            let mut worst = 0f32;
            for (r, row) in rows.iter().enumerate() {
                let ours = logits.get(r).unwrap().narrow(0, 0, row.len()).unwrap();
                let theirs = io["logits"]
                    .get(r)
                    .unwrap()
                    .narrow(0, 0, row.len())
                    .unwrap();
                worst = worst.max(max_abs_diff(&ours, &theirs));
            }
            eprintln!("{name} {dtype:?}: max abs diff to fp32 reference {worst:e}");
            assert!(
                worst <= tolerance,
                "{name} {dtype:?}: off by {worst} (> {tolerance})"
            );
            assert!(
                worst > 0.0,
                "{name} {dtype:?}: suspiciously exact, was it computed in fp32?"
            );
        }
    }
}

#[test]
fn kiln_written_model_reloads_bit_identically_and_shards() {
    let dir = fixtures().join("parity").join("rot8");
    let config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    for max_shard in [model::DEFAULT_MAX_SHARD_BYTES, 40_000] {
        let out = tempfile::tempdir().unwrap();
        let files = model::save_model(out.path(), &config, &params, DType::F32, max_shard).unwrap();
        if max_shard == 40_000 {
            assert!(
                files.contains(&"model.safetensors.index.json".to_string()),
                "{files:?}"
            );
            assert!(files.iter().filter(|f| f.starts_with("model-0")).count() > 2);
        } else {
            assert!(files.contains(&"model.safetensors".to_string()));
        }
        assert_eq!(
            model::load_config(out.path()).unwrap().n_embd,
            config.n_embd
        );
        let reloaded =
            model::load_parameters(out.path(), &config, DType::F32, &Device::Cpu).unwrap();
        for (name, original) in &params {
            let a = original.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = reloaded[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} changed in the round trip"
            );
        }
    }
}
