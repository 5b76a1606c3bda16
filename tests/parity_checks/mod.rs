//! The parity checks against HF transformers and PyTorch, as functions: `tests/parity.rs` runs
//! them on the fused CPU kernels, `tests/parity_generic.rs` on the device-generic code (what a
//! GPU runs) forced on the CPU, with the same tolerances.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use kiln::data::{Sequence, SequenceStream};
use kiln::model::{self, Batch};
use kiln::train::{ModelInit, TrainOptions};

use crate::common::*;

/// Two shapes per family (the second with odd sizes and the family's less common options).
pub const CONFIGS: &[&str] = &[
    "rot8", "full12", "gpt2", "gpt2_odd", "neo", "neo_odd", "neox", "neox_odd",
];

fn fixture_batch(io: &HashMap<String, Tensor>) -> (Vec<Vec<u32>>, Batch) {
    let rows = rows_from_fixture(&io["input_ids"], &io["attention_mask"]);
    let batch = Batch::right_padded(&rows, 0, &test_device()).unwrap();
    (rows, batch)
}

/// A fixture's model built on autograd variables, with its batch.
struct Trainable {
    io: HashMap<String, Tensor>,
    config: model::Config,
    vars: HashMap<String, Var>,
    model: model::Model,
    rows: Vec<Vec<u32>>,
    batch: Batch,
}

fn trainable(name: &str) -> Trainable {
    let dir = fixtures().join("parity").join(name);
    let io = load_tensors(&dir.join("io.safetensors"));
    let config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &test_device()).unwrap();
    let vars: HashMap<String, Var> = params
        .iter()
        .map(|(k, v)| (k.clone(), Var::from_tensor(v).unwrap()))
        .collect();
    let tensors = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let model =
        model::model_from_parameters(&config, &tensors, DType::F32, &test_device()).unwrap();
    let (rows, batch) = fixture_batch(&io);
    Trainable {
        io,
        config,
        vars,
        model,
        rows,
        batch,
    }
}

/// fp32 logits within 1e-4 of HF's, two configs.
pub fn fp32_logits() {
    for name in CONFIGS {
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io.safetensors"));
        let model = model::load_model(&dir, DType::F32, &test_device()).unwrap();
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

/// A padded row gives what the row alone gives, and HF's row-alone logits.
pub fn padded_rows() {
    for name in CONFIGS {
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io.safetensors"));
        let model = model::load_model(&dir, DType::F32, &test_device()).unwrap();
        let (rows, batch) = fixture_batch(&io);
        let padded = model.forward(&batch, None).unwrap();
        let alone_batch = Batch::right_padded(&rows[1..2], 0, &test_device()).unwrap();
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

/// HF's loss (≤ 1e-5) and every parameter's gradient (relative ≤ 1e-4) through candle autograd
/// over the full logits.
pub fn loss_and_gradients() {
    for name in CONFIGS {
        let Trainable {
            io,
            config,
            vars,
            model,
            rows,
            batch,
        } = trainable(name);
        let seq = rows.iter().map(Vec::len).max().unwrap();
        let logits = model.forward(&batch, None).unwrap();
        let labels = model::shifted_labels(&rows, seq);
        let loss = model::causal_lm_loss(&logits, &labels).unwrap();
        let ours = loss
            .to_device(&Device::Cpu)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let theirs = io["loss"].to_vec1::<f32>().unwrap()[0];
        eprintln!("{name}: loss {ours} vs {theirs}");
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{name}: loss {ours} vs HF {theirs}"
        );

        let grads = loss.backward().unwrap();
        assert_gradients_match(name, &config, &vars, &io, |_, var| {
            grads.get(var.as_tensor()).cloned()
        });
    }
}

/// Every parameter's gradient (from `grad`) within 1e-4 relative (Frobenius) of HF's.
fn assert_gradients_match(
    name: &str,
    config: &model::Config,
    vars: &HashMap<String, Var>,
    io: &HashMap<String, Tensor>,
    grad: impl Fn(&str, &Var) -> Option<Tensor>,
) {
    let mut worst = (0f32, String::new());
    for (param, var) in vars {
        let reference = io
            .get(&format!("grad.{param}"))
            .unwrap_or_else(|| panic!("fixture has no gradient for {param}"));
        let grad = grad(param, var).unwrap_or_else(|| panic!("no gradient reached {param}"));
        let err = relative_error(&grad, reference);
        if err > worst.0 {
            worst = (err, param.clone());
        }
    }
    eprintln!(
        "{name}: {} gradients, worst relative error {:e} ({})",
        vars.len(),
        worst.0,
        worst.1
    );
    assert_eq!(vars.len(), model::parameter_shapes(config).len());
    assert!(
        worst.0 <= 1e-4,
        "{name}: gradient of {} off by {}",
        worst.1,
        worst.0
    );
}

/// Half-precision forward passes against the fp32 reference. The tolerances are the documented
/// ones (README, "Precision"): the logits of these random models span roughly +-1, and half
/// precision keeps 11 (fp16) or 8 (bf16) significant bits through 2-3 layers of matmuls.
pub fn half_precision() {
    for (dtype, tolerance) in [(DType::F16, 3e-3f32), (DType::BF16, 2e-2)] {
        for name in CONFIGS {
            let dir = fixtures().join("parity").join(name);
            let io = load_tensors(&dir.join("io.safetensors"));
            let model = model::load_model(&dir, dtype, &test_device()).unwrap();
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

/// The trainer's loss and gradients (`Model::loss_and_grads`: the fused, chunked loss head, the
/// logits never whole, and autograd below it): HF's loss and every gradient, the head's included.
pub fn training_loss_head() {
    for name in CONFIGS {
        let Trainable {
            io,
            vars,
            model,
            rows,
            batch,
            config,
        } = trainable(name);
        let seq = rows.iter().map(Vec::len).max().unwrap();
        let labels = model::shifted_labels(&rows, seq);
        let targets = labels.iter().filter(|&&l| l >= 0).count();
        let loss = model
            .loss_and_grads(&batch, &labels, 1.0 / targets as f64)
            .unwrap()
            .expect("the fixture has labels");
        let ours = loss.nll_sum / targets as f64;
        let theirs = io["loss"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{name}: loss head {ours} vs HF {theirs}"
        );
        eprintln!("{name}: loss head {ours} vs {theirs}");
        assert_gradients_match(name, &config, &vars, &io, |param, var| {
            loss.get(param, var.as_tensor()).unwrap()
        });
    }
}

/// 20 AdamW steps with clipping and weight decay through the `Trainer`: per-step loss and
/// pre-clip gradient norm (relative ≤ 1e-4) and every final weight (≤ 1e-4) against PyTorch.
pub fn twenty_adamw_steps() {
    let fixture = fixtures().join("train_adamw");
    let reference = load_tensors(&fixture.join("train.safetensors"));
    let batches = reference["batches"].to_vec3::<i64>().unwrap();
    let rows: Vec<Sequence> = batches
        .iter()
        .flatten()
        .map(|row| Sequence::all_trained(row.iter().map(|&t| t as u32).collect()))
        .collect();
    let out = tempfile::tempdir().unwrap();
    let recipe: kiln::recipe::Recipe = serde_norway::from_str(&format!(
        "name: test\nmodel: {{from: fixture}}\n\
         data: {{train: [{{source: {{path: none.jsonl}}, template: text}}], seq_len: 16, shuffle: false}}\n\
         batch: {{global: 4, micro: 4}}\nsteps: 20\n\
         optimizer: {{lr: 1.0e-3, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}}\n\
         checkpoint: {{dir: {0}/checkpoints}}\ntracking: {{log_dir: {0}/runs}}\ndevice: {1}\n",
        out.path().display(),
        std::env::var("KILN_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
    ))
    .unwrap();
    let config = model::load_config(&fixture).unwrap();
    let init = ModelInit {
        params: model::load_parameters(&fixture, &config, DType::F32, &Device::Cpu).unwrap(),
        config,
        tokenizer: None,
        base_model: fixture.display().to_string(),
    };
    let summary = train_run(
        &recipe,
        init,
        SequenceStream::new(rows, 0, false),
        None,
        TrainOptions {
            quiet: true,
            threads: Some(2),
            ..TrainOptions::default()
        },
    )
    .unwrap();

    let losses = reference["losses"].to_vec1::<f32>().unwrap();
    let norms = reference["grad_norms"].to_vec1::<f32>().unwrap();
    assert_eq!(summary.losses.len(), 20);
    for (step, ((ours, theirs), (our_norm, their_norm))) in summary
        .losses
        .iter()
        .zip(&losses)
        .zip(summary.grad_norms.iter().zip(&norms))
        .enumerate()
    {
        let rel = (ours - *theirs as f64).abs() / (*theirs as f64).abs();
        assert!(
            rel < 1e-4,
            "step {}: loss {ours} vs PyTorch {theirs} (rel {rel:e})",
            step + 1
        );
        let rel = (our_norm - *their_norm as f64).abs() / (*their_norm as f64);
        assert!(
            rel < 1e-4,
            "step {}: grad norm {our_norm} vs PyTorch {their_norm}",
            step + 1
        );
    }
    let last = summary.last_checkpoint.expect("a final checkpoint");
    let ours = load_tensors(&last.join("model.safetensors"));
    let mut worst = 0f32;
    for (name, tensor) in &ours {
        let theirs = &reference[&format!("final.{name}")];
        worst = worst.max(max_abs_diff(tensor, theirs));
    }
    eprintln!("20 AdamW steps: final weights within {worst:e} of PyTorch's");
    assert!(
        worst < 1e-4,
        "final weights differ from PyTorch's by up to {worst:e}"
    );
}

/// Prefix-LM attention (`data.attention: prefix`) against HF given the same layout as a 4-D mask
/// and explicit positions: a packed row of two examples and a row of one, each example's prompt
/// read both ways, positions restarting per example. Logits, loss and every gradient.
pub fn prefix_lm() {
    for name in ["rot8", "gpt2"] {
        let Trainable {
            config,
            vars,
            model,
            ..
        } = trainable(name);
        let dir = fixtures().join("parity").join(name);
        let io = load_tensors(&dir.join("io_prefix_lm.safetensors"));
        let ids = io["input_ids"].to_vec2::<i64>().unwrap();
        let segment = io["segment"].to_vec2::<i64>().unwrap();
        let prefix = io["prefix"].to_vec2::<i64>().unwrap();
        let rows: Vec<Sequence> = (0..ids.len())
            .map(|r| Sequence {
                segment: segment[r].iter().map(|&s| s as u32).collect(),
                prefix: prefix[r].iter().map(|&p| p == 1).collect(),
                ..Sequence::all_trained(ids[r].iter().map(|&t| t as u32).collect())
            })
            .collect();
        let (batch, labels) = kiln::data::batch_of(&rows, 0, &test_device()).unwrap();
        let positions = batch.position_ids.to_dtype(DType::I64).unwrap();
        assert_eq!(
            max_abs_diff(
                &positions.to_dtype(DType::F32).unwrap(),
                &io["position_ids"].to_dtype(DType::F32).unwrap()
            ),
            0.0,
            "{name}: positions restart per example"
        );

        let logits = model.forward(&batch, None).unwrap();
        let diff = max_abs_diff(&logits, &io["logits"]);
        eprintln!("{name} prefix LM: logits max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{name}: prefix-LM logits differ by {diff}");

        let targets = labels.iter().filter(|&&l| l >= 0).count();
        let loss = model
            .loss_and_grads(&batch, &labels, 1.0 / targets as f64)
            .unwrap()
            .expect("labels");
        let ours = loss.nll_sum / targets as f64;
        let theirs = io["loss"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "{name}: prefix-LM loss {ours} vs HF {theirs}"
        );
        assert_gradients_match(name, &config, &vars, &io, |param, var| {
            loss.get(param, var.as_tensor()).unwrap()
        });
    }
}
