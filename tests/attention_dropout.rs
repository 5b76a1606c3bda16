//! Attention dropout in the fused CPU attention kernel (forward, and the backward that recomputes
//! the probabilities and draws the same factors again) against the device-generic code under
//! autograd, on a GPT-2 fixture in training. The switch to generic code is process-wide, so this
//! is a test binary of its own.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use kiln::model;
use kiln::ops::{Dropout, DropoutRates};

fn loss_and_grads(name: &str, dropout: Option<Dropout>) -> (Tensor, f64, Vec<(String, Tensor)>) {
    let dir = fixtures().join("parity").join(name);
    let config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    let mut vars: Vec<(String, Var)> = params
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let model = model::model_from_parameters(&config, &tensors, DType::F32, &Device::Cpu).unwrap();
    let rows: Vec<Vec<u32>> = vec![(0..13).map(|i| (i * 7 + 3) % 90).collect(); 2];
    let mut batch = model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    batch.dropout = dropout;
    let logits = model.forward(&batch, None).unwrap();
    let labels = model::shifted_labels(&rows, 13);
    let loss = model.loss_and_grads(&batch, &labels, 1.0).unwrap().unwrap();
    let grads = vars
        .iter()
        .map(|(name, var)| {
            (
                name.clone(),
                loss.get(name, var.as_tensor()).unwrap().unwrap(),
            )
        })
        .collect();
    (logits, loss.nll_sum, grads)
}

#[test]
fn fused_attention_dropout_matches_the_generic_code() {
    let rates = DropoutRates {
        resid: 0.0,
        embd: 0.0,
        attn: 0.3,
        lora: 0.0,
    };
    for name in ["gpt2", "rot8", "neox"] {
        let dropout = Dropout::for_rows(rates, 5, 9, 0, 2);
        let (fused_logits, fused_nll, fused_grads) = loss_and_grads(name, Some(dropout.clone()));
        let (plain_logits, _, _) = loss_and_grads(name, None);
        assert!(
            max_abs_diff(&fused_logits, &plain_logits) > 1e-3,
            "{name}: dropout changed nothing"
        );
        kiln::ops::use_generic(true);
        let (generic_logits, generic_nll, generic_grads) = loss_and_grads(name, Some(dropout));
        kiln::ops::use_generic(false);
        let diff = max_abs_diff(&fused_logits, &generic_logits);
        assert!(diff <= 1e-5, "{name}: logits differ by {diff}");
        assert!((fused_nll - generic_nll).abs() <= 1e-4, "{name}: nll");
        for ((param, ours), (_, theirs)) in fused_grads.iter().zip(&generic_grads) {
            let err = relative_error(ours, theirs);
            assert!(err <= 1e-4, "{name}: gradient of {param} off by {err}");
        }
    }
}
