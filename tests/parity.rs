//! Kiln's GPT-J against HF transformers' `GPTJForCausalLM`, on fixtures written by
//! `scripts/make_fixtures.py` (random models saved by HF itself, with HF's logits, loss and
//! gradients), on the fused CPU kernels. No Python is needed to run these;
//! `tests/parity_generic.rs` runs the same checks on the device-generic code.

mod common;
mod parity_checks;

use candle_core::{DType, Device};
use common::*;
use kiln::model;

#[test]
fn fp32_logits_match_transformers() {
    parity_checks::fp32_logits();
}

#[test]
fn padded_rows_match_rows_alone() {
    parity_checks::padded_rows();
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    parity_checks::loss_and_gradients();
}

#[test]
fn training_loss_head_and_gradients_match_transformers() {
    parity_checks::training_loss_head();
}

#[test]
fn half_precision_forward_is_close_to_fp32_reference() {
    parity_checks::half_precision();
}

#[test]
fn twenty_adamw_steps_match_pytorch() {
    parity_checks::twenty_adamw_steps();
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
            model::load_config(out.path()).unwrap().hidden_size(),
            config.hidden_size()
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

#[test]
fn prefix_lm_attention_matches_transformers_with_the_same_mask() {
    parity_checks::prefix_lm();
}
