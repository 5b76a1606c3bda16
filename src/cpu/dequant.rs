//! Products with a quantised frozen matrix (NF4 or int8 rows, see `ops::quant`) on the CPU,
//! dequantising it a slab of rows at a time inside the product: the whole matrix never exists
//! in fp32, only the slab being multiplied (about 4 MiB), so a 4-bit base stays 4-bit.
//!
//! Forward `y = x · Wᵀ` and backward `dx = dy · W`; the base gets no gradient. With bf16
//! operands the dequantised values are rounded to bf16, as bitsandbytes' `dequantize_4bit` into
//! a bf16 compute dtype gives them, and so is the activation side, with fp32 accumulation.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fused::contiguous_f32;
use super::gemm::{self, MatRef, Operands};
use super::matrix::round_to_bf16;
use super::vmath::simd_kernel;

/// bitsandbytes' NF4 code values (its `_NF4_QUANT_TABLE`): the format's definition.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// Values per NF4 block (bitsandbytes' and PEFT's default `blocksize`).
pub const NF4_BLOCK: usize = 64;
/// Absmax values per block of the double quantisation.
pub const DOUBLE_QUANT_BLOCK: usize = 256;

/// Values a slab of dequantised rows holds: large enough for the GEMM to run at speed, small
/// enough to stay a few MiB whatever the matrix.
const SLAB_VALUES: usize = 1 << 20;
/// The memory a product's slab takes.
pub const SLAB_BYTES: usize = SLAB_VALUES * 4;

/// Inputs with at most this many rows (decoding) dot each dequantised weight row with every
/// input row while it is in cache, instead of running a GEMM per slab.
const SKINNY_ROWS: usize = super::skinny::MAX_ROWS;

/// Weight rows per task of the skinny path.
const SKINNY_TASK_ROWS: usize = 32;

/// A quantised matrix's tensors on the CPU, as `ops::quant::QuantizedWeight` holds them.
#[derive(Debug, Clone)]
pub enum Parts {
    /// `packed`: u8, two codes a byte (the first in the high nibble); `absmax`: each block's
    /// fp32 absmax, or with double quantisation its u8 codes into bitsandbytes' dynamic map
    /// (`code`), each 256 of them scaled by `nested` and shifted by `offset`.
    Nf4 {
        packed: Tensor,
        absmax: Tensor,
        nested: Option<Nested>,
    },
    /// `values`: u8 holding each value's int8 two's complement; `scales`: fp32 per row.
    Int8 { values: Tensor, scales: Tensor },
}

/// Double quantisation's second level: the fp32 absmax of each 256 block absmax codes, their
/// code table and the mean subtracted before quantising.
#[derive(Debug, Clone)]
pub struct Nested {
    pub absmax: Tensor,
    pub code: &'static [f32; 256],
    pub offset: f32,
}

/// The product op: `x [m, cols] → x · Wᵀ [m, rows]` for the quantised `W [rows, cols]`.
#[derive(Debug, Clone)]
pub struct QuantizedLinearOp {
    pub parts: Parts,
    pub rows: usize,
    pub cols: usize,
    pub operands: Operands,
}

/// The bytes and scales of a quantised matrix, borrowed.
#[derive(Clone, Copy)]
pub enum QuantizedRef<'a> {
    Nf4 {
        packed: &'a [u8],
        absmax: Absmax<'a>,
    },
    Int8 {
        values: &'a [u8],
        scales: &'a [f32],
        cols: usize,
    },
}

#[derive(Clone, Copy)]
pub enum Absmax<'a> {
    Fp32(&'a [f32]),
    Double {
        codes: &'a [u8],
        nested: &'a [f32],
        code: &'a [f32; 256],
        offset: f32,
    },
}

impl Absmax<'_> {
    /// The absmax of blocks `first..first + out.len()`.
    fn decode(&self, first: usize, out: &mut [f32]) {
        match self {
            Absmax::Fp32(absmax) => out.copy_from_slice(&absmax[first..first + out.len()]),
            Absmax::Double {
                codes,
                nested,
                code,
                offset,
            } => {
                for (i, a) in out.iter_mut().enumerate() {
                    let block = first + i;
                    *a = code[codes[block] as usize] * nested[block / DOUBLE_QUANT_BLOCK] + offset;
                }
            }
        }
    }
}

impl QuantizedRef<'_> {
    /// Values `start..start + out.len()` of the row-major matrix, dequantised to fp32.
    pub fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        if out.is_empty() {
            return;
        }
        match *self {
            QuantizedRef::Nf4 { packed, absmax } => {
                let first = start / NF4_BLOCK;
                let last = (start + out.len() - 1) / NF4_BLOCK;
                let mut scales = vec![0f32; last + 1 - first];
                absmax.decode(first, &mut scales);
                if start.is_multiple_of(NF4_BLOCK) {
                    dequantize_nf4(&packed[start / 2..], &scales, out);
                } else {
                    // A range starting inside a block (a matrix whose width is not a multiple
                    // of 64): value by value.
                    for (i, v) in out.iter_mut().enumerate() {
                        let at = start + i;
                        let byte = packed[at / 2];
                        let code = if at.is_multiple_of(2) {
                            byte >> 4
                        } else {
                            byte & 0xF
                        };
                        *v = NF4_CODE[code as usize] * scales[at / NF4_BLOCK - first];
                    }
                }
            }
            QuantizedRef::Int8 {
                values,
                scales,
                cols,
            } => {
                let mut at = start;
                let mut out = out;
                while !out.is_empty() {
                    let row = at / cols;
                    let take = (cols - at % cols).min(out.len());
                    let (head, rest) = out.split_at_mut(take);
                    dequantize_int8(&values[at..at + take], scales[row], head);
                    at += take;
                    out = rest;
                }
            }
        }
    }
}

simd_kernel! {
    /// NF4 codes (two a byte, high nibble first) times their block's absmax, for a range that
    /// starts on a block: `out[i] = code[q_i] · scales[i / 64]`.
    pub(crate) fn dequantize_nf4(packed: &[u8], scales: &[f32], out: &mut [f32]) {
        for ((block, bytes), &scale) in out
            .chunks_mut(NF4_BLOCK)
            .zip(packed.chunks(NF4_BLOCK / 2))
            .zip(scales)
        {
            // The 16 products of this block's scale, so each value is one table lookup.
            let table: [f32; 16] = std::array::from_fn(|c| NF4_CODE[c] * scale);
            for (pair, &byte) in block.chunks_mut(2).zip(bytes) {
                pair[0] = table[(byte >> 4) as usize];
                if let Some(second) = pair.get_mut(1) {
                    *second = table[(byte & 0xF) as usize];
                }
            }
        }
    }
}

simd_kernel! {
    /// One row's int8 values (two's complement in u8) times the row's scale.
    pub(crate) fn dequantize_int8(values: &[u8], scale: f32, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(values) {
            *o = (q as i8) as f32 * scale;
        }
    }
}

/// Rows `first..first + count` of the `[rows, cols]` matrix in fp32 (bf16-rounded for bf16
/// operands), in parallel.
fn dequantize_rows(
    w: QuantizedRef,
    cols: usize,
    first: usize,
    out: &mut [f32],
    operands: Operands,
) {
    // Whole NF4 blocks per chunk: every chunk starts on a block when the width is a multiple of
    // 64 (every model here); other widths take the value-by-value path.
    let chunk = (cols * 8).div_ceil(NF4_BLOCK) * NF4_BLOCK;
    out.par_chunks_mut(chunk).enumerate().for_each(|(i, part)| {
        w.dequantize_range(first * cols + i * chunk, part);
        if operands == Operands::Bf16 {
            for v in part.iter_mut() {
                *v = round_to_bf16(*v);
            }
        }
    });
}

/// Weight rows per slab for a matrix of width `cols`.
fn slab_rows(cols: usize, rows: usize) -> usize {
    (SLAB_VALUES / cols.max(1)).clamp(1, rows.max(1))
}

/// `x` as the product's left operand: rounded to bf16 once for bf16 operands.
fn operand(x: &[f32], operands: Operands) -> std::borrow::Cow<'_, [f32]> {
    match operands {
        Operands::F32 => std::borrow::Cow::Borrowed(x),
        Operands::Bf16 => {
            std::borrow::Cow::Owned(x.par_iter().map(|&v| round_to_bf16(v)).collect())
        }
    }
}

/// `y = x · Wᵀ`: `x` `[m, cols]` row-major, `W` `[rows, cols]` quantised; `y` `[m, rows]`.
pub fn matmul_transposed(
    operands: Operands,
    x: &[f32],
    m: usize,
    w: QuantizedRef,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), m * cols, "input size");
    let x = operand(x, operands);
    let mut y = vec![0f32; m * rows];
    if m == 0 || rows == 0 {
        return y;
    }
    if m <= SKINNY_ROWS {
        // Decoding: each task dequantises a few weight rows and dots them with every input.
        let parts: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(SKINNY_TASK_ROWS))
            .into_par_iter()
            .map(|task| {
                let first = task * SKINNY_TASK_ROWS;
                let count = SKINNY_TASK_ROWS.min(rows - first);
                let mut slab = vec![0f32; count * cols];
                w.dequantize_range(first * cols, &mut slab);
                if operands == Operands::Bf16 {
                    slab.iter_mut().for_each(|v| *v = round_to_bf16(*v));
                }
                let part = super::skinny::matmul_transposed(&x, m, &slab, count, cols);
                (first, part)
            })
            .collect();
        for (first, part) in parts {
            let count = part.len() / m;
            for (row, values) in part.chunks(count).enumerate() {
                y[row * rows + first..row * rows + first + count].copy_from_slice(values);
            }
        }
        return y;
    }
    let per_slab = slab_rows(cols, rows);
    let mut slab = vec![0f32; per_slab * cols];
    let mut part = vec![0f32; m * per_slab];
    for first in (0..rows).step_by(per_slab) {
        let count = per_slab.min(rows - first);
        let slab = &mut slab[..count * cols];
        dequantize_rows(w, cols, first, slab, operands);
        let part = &mut part[..m * count];
        gemm::matmul(
            Operands::F32,
            MatRef::row_major(&x, m, cols),
            MatRef::row_major(slab, count, cols).t(),
            part,
            false,
        );
        y.par_chunks_mut(rows)
            .zip(part.par_chunks(count))
            .for_each(|(out, values)| out[first..first + count].copy_from_slice(values));
    }
    y
}

/// `dx = dy · W`: `dy` `[m, rows]` row-major, `W` `[rows, cols]` quantised; `dx` `[m, cols]`.
pub fn matmul(
    operands: Operands,
    dy: &[f32],
    m: usize,
    w: QuantizedRef,
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    assert_eq!(dy.len(), m * rows, "gradient size");
    let dy = operand(dy, operands);
    let mut dx = vec![0f32; m * cols];
    if m == 0 || rows == 0 {
        return dx;
    }
    let per_slab = slab_rows(cols, rows);
    let mut slab = vec![0f32; per_slab * cols];
    for first in (0..rows).step_by(per_slab) {
        let count = per_slab.min(rows - first);
        let slab = &mut slab[..count * cols];
        dequantize_rows(w, cols, first, slab, operands);
        // The slab's columns of dy, read in place.
        let dy_slab = MatRef {
            data: &dy[first..],
            rows: m,
            cols: count,
            row_stride: rows,
            col_stride: 1,
        };
        gemm::matmul(
            Operands::F32,
            dy_slab,
            MatRef::row_major(slab, count, cols),
            &mut dx,
            first > 0,
        );
    }
    dx
}

/// The bytes of a CPU u8 tensor, or its fp32 values, borrowed for `f`.
fn with_storage<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("quantised linear: the weight is not on the CPU");
    };
    f(storage, layout)
}

fn contiguous_u8<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u8]> {
    let data = storage.as_slice::<u8>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("quantised linear: the codes are not contiguous"),
    }
}

impl Parts {
    /// Runs `f` with the matrix's bytes and scales borrowed from the tensors.
    pub fn with_ref<R>(&self, cols: usize, f: impl FnOnce(QuantizedRef) -> R) -> Result<R> {
        match self {
            Parts::Int8 { values, scales } => with_storage(values, |vs, vl| {
                with_storage(scales, |ss, sl| {
                    Ok(f(QuantizedRef::Int8 {
                        values: contiguous_u8(vs, vl)?,
                        scales: contiguous_f32(ss, sl)?,
                        cols,
                    }))
                })
            }),
            Parts::Nf4 {
                packed,
                absmax,
                nested,
            } => with_storage(packed, |ps, pl| {
                let packed = contiguous_u8(ps, pl)?;
                with_storage(absmax, |a_s, al| match nested {
                    None => Ok(f(QuantizedRef::Nf4 {
                        packed,
                        absmax: Absmax::Fp32(contiguous_f32(a_s, al)?),
                    })),
                    Some(nested) => with_storage(&nested.absmax, |ns, nl| {
                        Ok(f(QuantizedRef::Nf4 {
                            packed,
                            absmax: Absmax::Double {
                                codes: contiguous_u8(a_s, al)?,
                                nested: contiguous_f32(ns, nl)?,
                                code: nested.code,
                                offset: nested.offset,
                            },
                        }))
                    }),
                })
            }),
        }
    }
}

impl CustomOp1 for QuantizedLinearOp {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if k != self.cols {
            candle_core::bail!("linear: input width {k}, weight width {}", self.cols);
        }
        let x = contiguous_f32(x, layout)?;
        let y = self.parts.with_ref(self.cols, |w| {
            matmul_transposed(self.operands, x, m, w, self.rows, self.cols)
        })?;
        Ok((CpuStorage::F32(y), (m, self.rows).into()))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        let m = x.dim(0)?;
        let dy = grad_out.contiguous()?;
        let dx = with_storage(&dy, |ds, dl| {
            let dy = contiguous_f32(ds, dl)?;
            self.parts.with_ref(self.cols, |w| {
                matmul(self.operands, dy, m, w, self.rows, self.cols)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (m, self.cols), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::tests::{random, reference};
    use crate::cpu::vmath::variants::{check_variants, variant_tests, LENGTHS};

    variant_tests! {
        fn dequantize_variants_agree(isa) {
            let cases: Vec<Vec<f32>> = LENGTHS
                .iter()
                .map(|&len| random(len.div_ceil(2) * 2, len as u64))
                .collect();
            check_variants("dequantize_nf4", isa, &cases, |xs| {
                let packed: Vec<u8> = xs.iter().map(|v| ((v + 1.0) * 127.0) as u8).collect();
                let scales: Vec<f32> = (0..packed.len().div_ceil(32)).map(|b| 0.5 + b as f32).collect();
                let mut out = vec![0f32; 2 * packed.len()];
                dequantize_nf4(&packed, &scales, &mut out);
                out
            });
            check_variants("dequantize_int8", isa, &cases, |xs| {
                let values: Vec<u8> = xs.iter().map(|v| ((v + 1.0) * 127.0) as u8).collect();
                let mut out = vec![0f32; values.len()];
                dequantize_int8(&values, 0.03, &mut out);
                out
            });
        }
    }

    /// A random NF4 matrix: codes and per-block scales, and its values dequantised one by one.
    fn nf4_matrix(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let n = rows * cols;
        let packed: Vec<u8> = random(n.div_ceil(2), seed)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        let absmax: Vec<f32> = random(n.div_ceil(NF4_BLOCK), seed + 1)
            .iter()
            .map(|v| v.abs() + 0.01)
            .collect();
        let values = (0..n)
            .map(|i| {
                let byte = packed[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                NF4_CODE[code as usize] * absmax[i / NF4_BLOCK]
            })
            .collect();
        (packed, absmax, values)
    }

    #[test]
    fn products_with_nf4_and_int8_equal_the_dense_products_of_their_values() {
        // Widths on and off the 64-value blocks; decoding's few rows and the GEMM's many.
        for &(m, rows, cols) in &[(1, 5, 64), (3, 40, 100), (33, 70, 128), (40, 9, 37)] {
            let (packed, absmax, dense) = nf4_matrix(rows, cols, 3);
            let int8: Vec<u8> = random(rows * cols, 5)
                .iter()
                .map(|v| (v * 127.0) as i8 as u8)
                .collect();
            let scales: Vec<f32> = (0..rows).map(|r| 0.01 * (r + 1) as f32).collect();
            let int8_dense: Vec<f32> = (0..rows * cols)
                .map(|i| (int8[i] as i8) as f32 * scales[i / cols])
                .collect();
            let cases = [
                (
                    QuantizedRef::Nf4 {
                        packed: &packed,
                        absmax: Absmax::Fp32(&absmax),
                    },
                    &dense,
                ),
                (
                    QuantizedRef::Int8 {
                        values: &int8,
                        scales: &scales,
                        cols,
                    },
                    &int8_dense,
                ),
            ];
            let x = random(m * cols, 7);
            let dy = random(m * rows, 8);
            for (w, values) in cases {
                let mut whole = vec![0f32; rows * cols];
                w.dequantize_range(0, &mut whole);
                assert_eq!(&whole, values, "dequantised values");
                for operands in [Operands::F32, Operands::Bf16] {
                    let dense_w = MatRef::row_major(values, rows, cols);
                    let expected = reference(operands, MatRef::row_major(&x, m, cols), dense_w.t());
                    let y = matmul_transposed(operands, &x, m, w, rows, cols);
                    for (a, b) in y.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() <= 1e-5 * cols as f32,
                            "{operands:?} y {a} vs {b}"
                        );
                    }
                    let expected = reference(operands, MatRef::row_major(&dy, m, rows), dense_w);
                    let dx = matmul(operands, &dy, m, w, rows, cols);
                    for (a, b) in dx.iter().zip(&expected) {
                        assert!(
                            (a - b).abs() <= 1e-5 * rows as f32,
                            "{operands:?} dx {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn double_quantised_absmax_decodes_through_the_code_and_the_offset() {
        let mut code = [0f32; 256];
        code.iter_mut()
            .enumerate()
            .for_each(|(i, c)| *c = i as f32 / 255.0);
        let codes: Vec<u8> = (0..300).map(|i| (i % 256) as u8).collect();
        let nested = [2.0f32, 4.0];
        let absmax = Absmax::Double {
            codes: &codes,
            nested: &nested,
            code: &code,
            offset: 0.5,
        };
        let mut out = vec![0f32; 3];
        absmax.decode(255, &mut out);
        assert_eq!(
            out,
            [1.0 * 2.0 + 0.5, 0.0 * 4.0 + 0.5, (1.0 / 255.0) * 4.0 + 0.5]
        );
    }
}
