//! Frozen weights in 4 and 8 bits, in the formats QLoRA users know.
//!
//! - **NF4** is bitsandbytes' 4-bit NormalFloat (Dettmers et al. 2023): each block of 64 values
//!   is scaled by its absolute maximum into [-1, 1] and each value stored as the index of the
//!   nearest of 16 code values (the quantiles of a normal distribution), two to a byte, the first
//!   in the high nibble. With double quantisation the blocks' fp32 absmax values are stored
//!   again in 8 bits: their mean is subtracted, and the rest quantised in blocks of 256 with
//!   bitsandbytes' signed dynamic 8-bit code. Kiln quantises as bitsandbytes' CPU path does
//!   (`quantize_4bit`, `quantize_blockwise`), so dequantised values are bitsandbytes' bit for bit.
//! - **int8** is LLM.int8()'s vector-wise quantisation without the outlier split: each output
//!   row `W[r]` is stored as `round(W[r] · 127 / absmax(W[r]))` (round half away from zero) with
//!   its `absmax / 127` as the scale; dequantised, `q · scale`.
//!
//! [`QuantizedWeight`] is a layer's frozen weight in one of these formats, held as tensors on
//! the model's device and multiplied by the CPU kernels of `cpu::dequant` or, on any other
//! device, dequantised one matrix at a time.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::Operands;

use crate::cpu::dequant::{Nested, Parts, QuantizedLinearOp};
pub use crate::cpu::dequant::{DOUBLE_QUANT_BLOCK, NF4_BLOCK, NF4_CODE, SLAB_BYTES};

/// A matrix (or any tensor) in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// Two codes a byte, the first in the high nibble; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub scales: Nf4Scales,
    pub shape: Vec<usize>,
    pub blocksize: usize,
}

/// Each NF4 block's absmax.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Scales {
    Fp32(Vec<f32>),
    /// Double quantisation: `code[quantized[i]] · absmax[i / 256] + offset`.
    Double {
        quantized: Vec<u8>,
        absmax: Vec<f32>,
        offset: f32,
    },
}

impl Nf4 {
    /// `values` (row-major, `shape`) in NF4 with `blocksize`-value blocks, as bitsandbytes'
    /// `quantize_4bit(..., quant_type="nf4", compress_statistics=double_quant)` stores them.
    pub fn quantize(values: &[f32], shape: &[usize], blocksize: usize, double_quant: bool) -> Self {
        assert_eq!(values.len(), shape.iter().product::<usize>(), "shape");
        let bounds = nf4_bounds();
        let n = values.len();
        let full = n - n % blocksize;
        let code_of = |scaled: f32| bounds.iter().filter(|&&b| b < scaled).count() as u8;
        // Blocks are independent: quantised in parallel, the result the same in any order.
        let mut absmax = vec![0f32; full / blocksize];
        let mut codes = vec![0u8; full];
        (codes.par_chunks_mut(blocksize))
            .zip(values[..full].par_chunks(blocksize))
            .zip(absmax.par_iter_mut())
            .for_each(|((out, block), absmax)| {
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *absmax = max;
                // bitsandbytes multiplies full blocks by the reciprocal...
                let inverse = 1.0 / max.max(1e-38);
                for (code, &v) in out.iter_mut().zip(block) {
                    *code = code_of((v * inverse).clamp(-1.0, 1.0));
                }
            });
        if full < n {
            // ...and divides the partial last one, whose stored absmax is clamped.
            let rest = &values[full..];
            let max = rest.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
            absmax.push(max);
            codes.extend(rest.iter().map(|&v| code_of((v / max).clamp(-1.0, 1.0))));
        }
        if codes.len() % 2 == 1 {
            codes.push(code_of(0.0));
        }
        let packed = codes
            .par_chunks(2)
            .map(|pair| (pair[0] << 4) | pair[1])
            .collect();
        let scales = match double_quant {
            false => Nf4Scales::Fp32(absmax),
            true => {
                let offset = mean(&absmax);
                let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
                let (quantized, absmax) = quantize_blockwise_8bit(&centred, DOUBLE_QUANT_BLOCK);
                Nf4Scales::Double {
                    quantized,
                    absmax,
                    offset,
                }
            }
        };
        Self {
            packed,
            scales,
            shape: shape.to_vec(),
            blocksize,
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each block's absmax (decoded from 8 bits with double quantisation).
    pub fn block_absmax(&self) -> Vec<f32> {
        match &self.scales {
            Nf4Scales::Fp32(absmax) => absmax.clone(),
            Nf4Scales::Double {
                quantized,
                absmax,
                offset,
            } => {
                let code = dynamic_map();
                (quantized.iter().enumerate())
                    .map(|(i, &q)| code[q as usize] * absmax[i / DOUBLE_QUANT_BLOCK] + offset)
                    .collect()
            }
        }
    }

    /// The values in fp32: `code[q] · absmax` of each one's block (bitsandbytes'
    /// `dequantize_4bit` in fp32; narrower dtypes round this).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.block_absmax();
        (0..self.len())
            .map(|i| {
                let byte = self.packed[i / 2];
                let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                NF4_CODE[code as usize] * absmax[i / self.blocksize]
            })
            .collect()
    }

    /// Bytes held: the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.scales {
                Nf4Scales::Fp32(absmax) => absmax.len() * 4,
                Nf4Scales::Double {
                    quantized, absmax, ..
                } => quantized.len() + absmax.len() * 4 + 4,
            }
    }
}

/// The midpoints between consecutive NF4 codes (bitsandbytes' `bucketize` boundaries).
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The mean as torch computes it for an fp32 tensor on the CPU.
fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64) as f32
}

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map()`): 256 values in [-1, 1],
/// sorted, dense near 0.
pub fn dynamic_map() -> [f32; 256] {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    let push_means = |data: &mut Vec<f64>, items: usize, scale: f64| {
        let boundaries = linspace_f32(0.1, 1.0, items);
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            // torch multiplies the fp32 means by the scale rounded to fp32.
            let value = (scale as f32 * mean) as f64;
            data.push(value);
            data.push(-value);
        }
    };
    for i in 0..MAX_EXPONENT_BITS {
        let items = 2usize.pow((i + NON_SIGN_BITS - MAX_EXPONENT_BITS) as u32) + 1;
        // Python's `10 ** k`: the correctly rounded decimal, as parsing gives it.
        let scale: f64 = format!("1e{}", -(MAX_EXPONENT_BITS - 1) + i)
            .parse()
            .expect("a decimal");
        push_means(&mut data, items, scale);
    }
    // 2^(7 - 7) - 1 = 0 additional items.
    data.push(0.0);
    data.push(1.0);
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(f64::total_cmp);
    std::array::from_fn(|i| data[i] as f32)
}

/// `torch.linspace(start, end, steps, dtype=float32)` as torch's CPU kernel computes it: the
/// first half counted up from `start`, the rest down from `end`, each value one fused
/// multiply-add in fp32 (the compiler contracts torch's `start + step * i`).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| match i < half {
            true => step.mul_add(i as f32, start),
            false => (-step).mul_add((steps - 1 - i) as f32, end),
        })
        .collect()
}

/// bitsandbytes' CPU `quantize_blockwise` with its dynamic code: each block scaled by its
/// absmax, each value looked up in a 65,536-entry table of the nearest code to evenly spaced
/// points of [-1, 1]. Returns the codes and each block's absmax.
fn quantize_blockwise_8bit(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    const LUT: usize = 65_536;
    let code = dynamic_map();
    let midpoints: Vec<f32> = code.windows(2).map(|p| 0.5 * (p[0] + p[1])).collect();
    let mut lut = vec![0u8; LUT];
    let mut index = 0usize;
    for (i, entry) in lut.iter_mut().enumerate() {
        let value = -1.0f32 + (2.0f32 * i as f32) / (LUT - 1) as f32;
        while index < midpoints.len() && midpoints[index] < value {
            index += 1;
        }
        *entry = index as u8;
    }
    let mut codes = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        if max == 0.0 {
            codes.extend(std::iter::repeat_n(0, block.len()));
            continue;
        }
        let inverse = 1.0 / max;
        codes.extend(block.iter().map(|&v| {
            let scaled = (v * inverse).clamp(-1.0, 1.0);
            lut[((scaled + 1.0) * 0.5 * (LUT - 1) as f32 + 0.5) as u16 as usize]
        }));
    }
    (codes, absmax)
}

/// A matrix `[rows, cols]` in int8, one scale per row.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub values: Vec<i8>,
    /// `absmax(row) / 127` of each row.
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Int8Rows {
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "shape");
        let mut quantized = vec![0i8; values.len()];
        let mut scales = vec![0f32; rows];
        (quantized.par_chunks_mut(cols.max(1)))
            .zip(values.par_chunks(cols.max(1)))
            .zip(scales.par_iter_mut())
            .for_each(|((out, row), scale)| {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = max / 127.0;
                if *scale > 0.0 {
                    for (q, &v) in out.iter_mut().zip(row) {
                        *q = (v / *scale).round().clamp(-127.0, 127.0) as i8;
                    }
                }
            });
        Self {
            values: quantized,
            scales,
            rows,
            cols,
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        (self.values.iter().enumerate())
            .map(|(i, &q)| q as f32 * self.scales[i / self.cols.max(1)])
            .collect()
    }
}

/// How a model's frozen linear weights are stored: the recipe's `model.quantize` (with
/// `model.double_quant`) and the inference verbs' `--quantize` (`--double-quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// bitsandbytes' 4-bit NormalFloat, blocks of 64.
    Nf4,
    /// LLM.int8()'s vector-wise int8, one scale per output row.
    Int8,
}

impl std::str::FromStr for QuantFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(Self::Nf4),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown quantisation {other:?} (expected nf4 or int8)"
            )),
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Nf4 => "nf4",
            Self::Int8 => "int8",
        })
    }
}

/// A format and, for NF4, whether the block absmax values are quantised again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub format: QuantFormat,
    pub double_quant: bool,
}

impl Quantization {
    /// Bytes a `[rows, cols]` matrix takes in this format.
    pub fn bytes(&self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        match self.format {
            QuantFormat::Int8 => n + rows as u64 * 4,
            QuantFormat::Nf4 => {
                let blocks = n.div_ceil(NF4_BLOCK as u64);
                let scales = match self.double_quant {
                    false => blocks * 4,
                    true => blocks + blocks.div_ceil(DOUBLE_QUANT_BLOCK as u64) * 4 + 4,
                };
                n.div_ceil(2) + scales
            }
        }
    }
}

/// The suffixes (after the weight's own name) of a quantised weight's tensors, as the layers
/// read them from a model's named tensors. bitsandbytes' state dicts use the same words.
pub const NF4_SUFFIX: &str = "nf4";
pub const ABSMAX_SUFFIX: &str = "absmax";
pub const NESTED_ABSMAX_SUFFIX: &str = "nested_absmax";
pub const NESTED_OFFSET_SUFFIX: &str = "nested_offset";
pub const INT8_SUFFIX: &str = "int8";
pub const SCALES_SUFFIX: &str = "scales";
const SUFFIXES: [&str; 6] = [
    NF4_SUFFIX,
    ABSMAX_SUFFIX,
    NESTED_ABSMAX_SUFFIX,
    NESTED_OFFSET_SUFFIX,
    INT8_SUFFIX,
    SCALES_SUFFIX,
];

/// The dynamic 8-bit code, computed once.
fn dynamic_code() -> &'static [f32; 256] {
    static CODE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    CODE.get_or_init(dynamic_map)
}

/// A frozen `[rows, cols]` linear weight stored quantised, as tensors on the model's device.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    parts: Parts,
    rows: usize,
    cols: usize,
}

impl QuantizedWeight {
    /// `weight` (`[rows, cols]`, any float dtype) quantised, on its own device.
    pub fn quantize(weight: &Tensor, quantization: Quantization) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let device = weight.device();
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let parts = match quantization.format {
            QuantFormat::Int8 => {
                let q = Int8Rows::quantize(&values, rows, cols);
                let bytes: Vec<u8> = q.values.iter().map(|&v| v as u8).collect();
                Parts::Int8 {
                    values: Tensor::from_vec(bytes, (rows, cols), device)?,
                    scales: Tensor::from_vec(q.scales, rows, device)?,
                }
            }
            QuantFormat::Nf4 => {
                let q = Nf4::quantize(&values, &[rows, cols], NF4_BLOCK, quantization.double_quant);
                let packed_len = q.packed.len();
                let packed = Tensor::from_vec(q.packed, packed_len, device)?;
                match q.scales {
                    Nf4Scales::Fp32(absmax) => Parts::Nf4 {
                        packed,
                        absmax: Tensor::new(absmax, device)?,
                        nested: None,
                    },
                    Nf4Scales::Double {
                        quantized,
                        absmax,
                        offset,
                    } => Parts::Nf4 {
                        packed,
                        absmax: Tensor::new(quantized, device)?,
                        nested: Some(Nested {
                            absmax: Tensor::new(absmax, device)?,
                            code: dynamic_code(),
                            offset,
                        }),
                    },
                }
            }
        };
        Ok(Self { parts, rows, cols })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn format(&self) -> QuantFormat {
        match self.parts {
            Parts::Nf4 { .. } => QuantFormat::Nf4,
            Parts::Int8 { .. } => QuantFormat::Int8,
        }
    }

    /// The tensors it is held as, named after the weight's own `name`.
    pub fn named_tensors(&self, name: &str) -> Result<Vec<(String, Tensor)>> {
        let named = |suffix: &str, t: &Tensor| (format!("{name}.{suffix}"), t.clone());
        Ok(match &self.parts {
            Parts::Int8 { values, scales } => {
                vec![named(INT8_SUFFIX, values), named(SCALES_SUFFIX, scales)]
            }
            Parts::Nf4 {
                packed,
                absmax,
                nested,
            } => {
                let mut tensors = vec![named(NF4_SUFFIX, packed), named(ABSMAX_SUFFIX, absmax)];
                if let Some(nested) = nested {
                    tensors.push(named(NESTED_ABSMAX_SUFFIX, &nested.absmax));
                    let offset = Tensor::new(&[nested.offset], packed.device())?;
                    tensors.push(named(NESTED_OFFSET_SUFFIX, &offset));
                }
                tensors
            }
        })
    }

    /// Whether `name` is one of the tensors a quantised weight is held as: `<...>.weight.<part>`
    /// (no parameter of a model is named so).
    pub fn is_part(name: &str) -> bool {
        name.rsplit_once('.').is_some_and(|(weight, suffix)| {
            weight.ends_with(".weight") && SUFFIXES.contains(&suffix)
        })
    }

    /// The quantised weight `weight` (`[rows, cols]`) of the layer `vb` points at, if the
    /// weights hold it quantised.
    pub fn load(vb: &VarBuilder, weight: &str, rows: usize, cols: usize) -> Result<Option<Self>> {
        let name = |suffix: &str| format!("{weight}.{suffix}");
        let get = |suffix: &str, dtype: DType| vb.get_unchecked_dtype(&name(suffix), dtype);
        let expect = |t: &Tensor, len: usize, suffix: &str| -> Result<()> {
            if t.elem_count() != len {
                let prefix = vb.prefix();
                let full = match prefix.is_empty() {
                    true => name(suffix),
                    false => format!("{prefix}.{}", name(suffix)),
                };
                candle_core::bail!(
                    "{full}: {} values, a [{rows}, {cols}] weight needs {len}",
                    t.elem_count()
                );
            }
            Ok(())
        };
        let n = rows * cols;
        let parts = if vb.contains_tensor(&name(NF4_SUFFIX)) {
            let packed = get(NF4_SUFFIX, DType::U8)?;
            expect(&packed, n.div_ceil(2), NF4_SUFFIX)?;
            let blocks = n.div_ceil(NF4_BLOCK);
            let nested = match vb.contains_tensor(&name(NESTED_ABSMAX_SUFFIX)) {
                false => None,
                true => {
                    let absmax = get(NESTED_ABSMAX_SUFFIX, DType::F32)?;
                    expect(
                        &absmax,
                        blocks.div_ceil(DOUBLE_QUANT_BLOCK),
                        NESTED_ABSMAX_SUFFIX,
                    )?;
                    let offset = get(NESTED_OFFSET_SUFFIX, DType::F32)?;
                    expect(&offset, 1, NESTED_OFFSET_SUFFIX)?;
                    let offset = offset.flatten_all()?.to_vec1::<f32>()?[0];
                    Some(Nested {
                        absmax,
                        code: dynamic_code(),
                        offset,
                    })
                }
            };
            let absmax_dtype = if nested.is_some() {
                DType::U8
            } else {
                DType::F32
            };
            let absmax = get(ABSMAX_SUFFIX, absmax_dtype)?;
            expect(&absmax, blocks, ABSMAX_SUFFIX)?;
            Parts::Nf4 {
                packed,
                absmax,
                nested,
            }
        } else if vb.contains_tensor(&name(INT8_SUFFIX)) {
            let values = get(INT8_SUFFIX, DType::U8)?;
            expect(&values, n, INT8_SUFFIX)?;
            let scales = get(SCALES_SUFFIX, DType::F32)?;
            expect(&scales, rows, SCALES_SUFFIX)?;
            Parts::Int8 { values, scales }
        } else {
            return Ok(None);
        };
        Ok(Some(Self { parts, rows, cols }))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.parts {
            Parts::Int8 { values, scales } => size(values) + size(scales),
            Parts::Nf4 {
                packed,
                absmax,
                nested,
            } => size(packed) + size(absmax) + nested.as_ref().map_or(0, |n| size(&n.absmax) + 4),
        }
    }

    /// The weight in `dtype` on its device, with tensor ops any device runs (what a GPU
    /// computes with, one matrix at a time): each byte looked up in a table of the values it
    /// stands for, times its block's or row's scale, in fp32, then cast.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let n = self.rows * self.cols;
        let values = match &self.parts {
            Parts::Nf4 {
                packed,
                absmax,
                nested,
            } => {
                let device = packed.device();
                let high: Vec<f32> = (0..256).map(|b| NF4_CODE[b >> 4]).collect();
                let low: Vec<f32> = (0..256).map(|b| NF4_CODE[b & 0xF]).collect();
                let bytes = packed.to_dtype(DType::U32)?;
                let high = Tensor::new(high, device)?.index_select(&bytes, 0)?;
                let low = Tensor::new(low, device)?.index_select(&bytes, 0)?;
                let codes = Tensor::stack(&[high, low], 1)?
                    .flatten_all()?
                    .narrow(0, 0, n)?;
                let blocks = n.div_ceil(NF4_BLOCK);
                let scales = match nested {
                    None => absmax.clone(),
                    Some(nested) => {
                        let code = Tensor::new(&nested.code[..], device)?;
                        let per_block = (nested.absmax.unsqueeze(1)?)
                            .broadcast_as((nested.absmax.elem_count(), DOUBLE_QUANT_BLOCK))?
                            .contiguous()?
                            .flatten_all()?
                            .narrow(0, 0, blocks)?;
                        let decoded = code.index_select(&absmax.to_dtype(DType::U32)?, 0)?;
                        (decoded * per_block)?.affine(1.0, nested.offset as f64)?
                    }
                };
                codes
                    .pad_with_zeros(0, 0, blocks * NF4_BLOCK - n)?
                    .reshape((blocks, NF4_BLOCK))?
                    .broadcast_mul(&scales.unsqueeze(1)?)?
                    .flatten_all()?
                    .narrow(0, 0, n)?
            }
            Parts::Int8 { values, scales } => {
                let table: Vec<f32> = (0..256).map(|b| (b as u8 as i8) as f32).collect();
                let indices = values.flatten_all()?.to_dtype(DType::U32)?;
                Tensor::new(table, values.device())?
                    .index_select(&indices, 0)?
                    .reshape((self.rows, self.cols))?
                    .broadcast_mul(&scales.unsqueeze(1)?)?
            }
        };
        values.reshape((self.rows, self.cols))?.to_dtype(dtype)
    }

    /// `xs · Wᵀ` for a 2-D `xs`: on the CPU in fp32 by the kernels that dequantise inside the
    /// product; elsewhere by dequantising the matrix into `xs`'s dtype and multiplying.
    pub fn matmul_transposed(&self, xs: &Tensor, operands: Operands) -> Result<Tensor> {
        if super::use_fused(xs) {
            let op = QuantizedLinearOp {
                parts: self.parts.clone(),
                rows: self.rows,
                cols: self.cols,
                operands,
            };
            return xs.contiguous()?.apply_op1(op);
        }
        xs.matmul(&self.dequantize(xs.dtype())?.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_code_is_sorted_signed_and_spans_minus_one_to_one() {
        let code = dynamic_map();
        assert!(code.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(code[255], 1.0);
        assert!(code[0] < -0.99 && code[0] > -1.0);
        assert!(code.contains(&0.0));
    }

    #[test]
    fn nf4_round_trips_its_code_values_and_packs_high_nibble_first() {
        // A block whose absmax is 1 holds the code values exactly.
        let values: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16]).collect();
        let q = Nf4::quantize(&values, &[64], 64, false);
        assert_eq!(q.dequantize(), values);
        assert_eq!(
            q.packed[0], 0x01,
            "codes 0 and 1: the first in the high nibble"
        );
        assert_eq!(q.bytes(), 32 + 4);
    }

    #[test]
    fn int8_rows_scale_each_row_by_its_absmax() {
        let values = [1.0, -2.0, 0.5, 0.0, 0.0, 0.0];
        let q = Int8Rows::quantize(&values, 2, 3);
        assert_eq!(q.values, [64, -127, 32, 0, 0, 0]);
        assert_eq!(q.scales, [2.0 / 127.0, 0.0]);
        let back = q.dequantize();
        assert!((back[1] + 2.0).abs() < 1e-6 && back[3] == 0.0);
    }
}
