//! The operations the model files are written in: linear layers, LayerNorm, causal attention,
//! gelu and the fused lm_head loss, plus the optimizer's element-wise passes.
//!
//! Each is one function that runs Kiln's fused CPU kernels ([`crate::cpu`]) where they apply —
//! fp32 tensors on the CPU — and device-generic candle code everywhere else (a GPU, fp16 or bf16
//! tensors). Setting `KILN_OPS=generic` (or calling [`use_generic`]) sends the CPU down the
//! generic code too, which is how the path a GPU takes is tested against Hugging Face on a
//! machine without one. Nothing outside this module calls into `crate::cpu`.

mod attention;
mod device;
mod dropout;
mod layers;
mod loss;
mod optim;
pub mod quant;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Device, Tensor};

pub use crate::cpu::gemm::Operands;
pub use attention::{
    causal_attention, softmax_last_dim, training_attention_note, AttentionKind, AttentionMask,
    KvCache, LayerCache, PrefixLayout, Rotary, RotaryPairs,
};
pub use device::parse_device;
pub use dropout::{Dropout, DropoutRates, Site};
pub use layers::{embedding, gelu, gelu_new, layer_norm, linear, LayerNorm, Linear};
pub use loss::{
    composite_nll_sum, lm_head_loss, lm_head_loss_weighted_by, GradScale, LmLoss, Weigh,
    CPU_CHUNK_ROWS as LOSS_CHUNK_ROWS,
};
pub use optim::{adamw_step, add_in_place, global_norm, AdamWStep};

/// 0: not decided yet (read `KILN_OPS` on first use), 1: fused CPU kernels, 2: generic only.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether every op runs its device-generic code, the CPU included.
pub fn generic_only() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let generic = std::env::var("KILN_OPS").is_ok_and(|v| v == "generic");
            MODE.store(if generic { 2 } else { 1 }, Ordering::Relaxed);
            generic
        }
    }
}

/// Forces (or stops forcing) the device-generic code on the CPU, for the whole process.
pub fn use_generic(generic: bool) {
    MODE.store(if generic { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether `t` is stored in half precision (fp16 or bf16).
fn is_half(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F16 | DType::BF16)
}

/// Whether the fused CPU kernels take `xs`: fp32 on the CPU, unless generic code is forced.
fn use_fused(xs: &Tensor) -> bool {
    xs.device().is_cpu() && xs.dtype() == DType::F32 && !generic_only()
}

/// How a model loaded in `dtype` on `device` stores its weights and multiplies: bf16 on the CPU
/// keeps weights and activations in fp32 and rounds only the matmul operands to bf16 (fp32
/// accumulation, as torch's autocast does); AMX multiplies those at several times the fp32 rate,
/// while the CPU has no faster bf16 element-wise arithmetic, so converting activations would only
/// cost time and accuracy. Everywhere else the weights are in `dtype` and so is the arithmetic.
pub fn weight_dtype_and_operands(device: &Device, dtype: DType) -> (DType, Operands) {
    weight_dtype_and_operands_on(device.is_cpu(), dtype)
}

/// [`weight_dtype_and_operands`] for a CPU (`on_cpu`) or a GPU, without the device at hand.
pub fn weight_dtype_and_operands_on(on_cpu: bool, dtype: DType) -> (DType, Operands) {
    if on_cpu && dtype == DType::BF16 && !generic_only() {
        (DType::F32, Operands::Bf16)
    } else {
        (dtype, Operands::F32)
    }
}

/// Workers each replica's micro-batch rows are split over, each training its own rows on its own
/// thread: on the CPU one per thread, elsewhere one (the device does the parallel work).
///
/// On a few cores, one worker per thread beats sharing every op between the threads: the
/// training shapes' GEMMs scale well under 2x over threads and the small ops between them run on
/// one core, whereas separate rows keep every core on its own work all step (on the 2-core
/// benchmark VM, about 20% more tokens/s). Each worker holds a full gradient of the model, so
/// models whose extra gradients would exceed [`WORKER_GRADIENT_BUDGET`] share ops instead.
pub fn workers_per_replica(device: &Device, threads: usize, gradient_bytes: usize) -> usize {
    workers_per_replica_on(device.is_cpu(), threads, gradient_bytes)
}

/// [`workers_per_replica`] for a CPU (`on_cpu`) or a GPU, without the device at hand.
pub fn workers_per_replica_on(on_cpu: bool, threads: usize, gradient_bytes: usize) -> usize {
    let affordable = 1 + WORKER_GRADIENT_BUDGET / gradient_bytes.max(1);
    if on_cpu {
        threads.min(affordable).max(1)
    } else {
        1
    }
}

/// Memory the extra per-worker gradients may take (GPT-J `small`: 116 MB each).
const WORKER_GRADIENT_BUDGET: usize = 1 << 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_stop_where_their_gradients_outgrow_the_budget() {
        let cpu = Device::Cpu;
        let small = 116 << 20;
        assert_eq!(workers_per_replica(&cpu, 2, small), 2);
        assert_eq!(workers_per_replica(&cpu, 16, small), 9);
        assert_eq!(workers_per_replica(&cpu, 1, small), 1);
        let gpt_j_6b = 6 << 32;
        assert_eq!(workers_per_replica(&cpu, 16, gpt_j_6b), 1);
    }
}
