//! Kiln's CPU kernels: a GEMM front end over the `gemm` crate and AMX tiles, a few-row `x·Wᵀ` for
//! decoding, fused candle ops with one-pass backwards, and the vectorised element-wise loops they
//! share. Only [`crate::ops`] calls into this module; model and trainer code never do.

pub(crate) mod amx;
pub(crate) mod dequant;
pub(crate) mod fused;
pub(crate) mod gemm;
pub(crate) mod matrix;
#[cfg(test)]
mod simd_variants;
pub(crate) mod skinny;
pub(crate) mod vmath;
