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

/// bitsandbytes' NF4 code values (`_NF4_QUANT_TABLE`): the format's definition.
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
        let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
        let mut codes = Vec::with_capacity(n + 1);
        let code_of = |scaled: f32| bounds.iter().filter(|&&b| b < scaled).count() as u8;
        for block in values[..full].chunks(blocksize) {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(max);
            // bitsandbytes multiplies full blocks by the reciprocal...
            let inverse = 1.0 / max.max(1e-38);
            codes.extend(
                block
                    .iter()
                    .map(|&v| code_of((v * inverse).clamp(-1.0, 1.0))),
            );
        }
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
            .chunks(2)
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
        let mut quantized = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(rows);
        for row in values.chunks(cols.max(1)) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            scales.push(scale);
            quantized.extend(row.iter().map(|&v| match scale > 0.0 {
                true => (v / scale).round().clamp(-127.0, 127.0) as i8,
                false => 0,
            }));
        }
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
