//! The device-generic code of every op (`kiln::ops`) — what a GPU runs — forced on the CPU and
//! held to the same HF/PyTorch fixtures and tolerances as the fused CPU kernels in
//! `tests/parity.rs`: logits, loss, every gradient, the trainer's loss head, half-precision
//! forwards and 20 AdamW steps.
//!
//! The switch is process-wide, and every test here sets it first, so this file is a test binary
//! of its own.

mod common;
mod parity_checks;

fn generic() {
    kiln::ops::use_generic(true);
    assert!(kiln::ops::generic_only());
}

#[test]
fn fp32_logits_match_transformers() {
    generic();
    parity_checks::fp32_logits();
}

#[test]
fn padded_rows_match_rows_alone() {
    generic();
    parity_checks::padded_rows();
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    generic();
    parity_checks::loss_and_gradients();
}

#[test]
fn training_loss_head_and_gradients_match_transformers() {
    generic();
    parity_checks::training_loss_head();
}

#[test]
fn half_precision_forward_is_close_to_fp32_reference() {
    generic();
    parity_checks::half_precision();
}

#[test]
fn twenty_adamw_steps_match_pytorch() {
    generic();
    parity_checks::twenty_adamw_steps();
}

#[test]
fn prefix_lm_attention_matches_transformers_with_the_same_mask() {
    generic();
    parity_checks::prefix_lm();
}
