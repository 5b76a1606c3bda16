//! Matrix products on raw fp32 slices for the fused CPU paths (the loss head, bf16 linears).
//!
//! `Operands::F32` is gemm's AVX-512/AVX2 SGEMM. `Operands::Bf16` rounds both operands to
//! bfloat16 and accumulates in fp32, which is what torch's bf16 autocast and tensor cores do:
//! on CPUs with AMX the tile unit computes it (`amx.rs`; 1.5-3x the fp32 GEMM on the training
//! shapes here, where memory traffic rather than arithmetic bounds it); elsewhere the
//! operands are rounded into fp32 copies and multiplied by the SGEMM, the same products with
//! only the summation order differing.

use rayon::prelude::*;

pub use super::matrix::{round_to_bf16, MatRef};

/// The precision of a product's operands; accumulation is fp32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operands {
    F32,
    Bf16,
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows × b.cols`.
pub fn matmul(operands: Operands, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    matmul_prepared(a, &Rhs::prepare(operands, b), c, accumulate)
}

/// A right-hand operand made ready once for several products (the loss multiplies every
/// chunk of rows by the same head weight).
pub enum Rhs<'a> {
    F32(MatRef<'a>),
    /// bf16 operands without AMX: the values rounded, kept as fp32.
    Rounded(Rounded),
    /// A view of values already rounded (another orientation of a [`Rhs::Rounded`]).
    RoundedView(MatRef<'a>),
    Tiles(super::amx::PackedB),
}

impl<'a> Rhs<'a> {
    pub fn prepare(operands: Operands, b: MatRef<'a>) -> Self {
        match operands {
            Operands::F32 => Rhs::F32(b),
            Operands::Bf16 if super::amx::available() => Rhs::Tiles(super::amx::PackedB::new(b)),
            Operands::Bf16 => Self::rounded(b),
        }
    }

    /// bf16 operands through the fp32 GEMM (what machines without AMX use).
    pub fn rounded(b: MatRef) -> Self {
        Rhs::Rounded(Rounded::of(b))
    }

    /// The transpose of this operand without a second copy of its values, where the layout
    /// allows (AMX tiles are packed for one orientation: `None`).
    pub fn transposed(&self) -> Option<Rhs<'_>> {
        match self {
            Rhs::F32(b) => Some(Rhs::F32(b.t())),
            Rhs::Rounded(b) => Some(Rhs::RoundedView(b.view().t())),
            Rhs::RoundedView(b) => Some(Rhs::RoundedView(b.t())),
            Rhs::Tiles(_) => None,
        }
    }

    fn dims(&self) -> (usize, usize) {
        match self {
            Rhs::F32(b) | Rhs::RoundedView(b) => (b.rows, b.cols),
            Rhs::Rounded(b) => (b.rows, b.cols),
            Rhs::Tiles(packed) => (packed.rows(), packed.cols()),
        }
    }
}

/// `c (+)= a · b` with `b` prepared; `a` is rounded the way `b` was.
pub fn matmul_prepared(a: MatRef, b: &Rhs, c: &mut [f32], accumulate: bool) {
    let (inner, cols) = b.dims();
    assert_eq!(a.cols, inner, "inner dimensions differ");
    assert_eq!(c.len(), a.rows * cols, "output size");
    if a.rows == 0 || cols == 0 {
        return;
    }
    if inner == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    match b {
        Rhs::F32(b) => sgemm(a, *b, c, accumulate),
        Rhs::Rounded(b) => sgemm(Rounded::of(a).view(), b.view(), c, accumulate),
        Rhs::RoundedView(b) => sgemm(Rounded::of(a).view(), *b, c, accumulate),
        Rhs::Tiles(packed) => super::amx::matmul_packed(a, packed, c, accumulate),
    }
}

/// fp32 `c (+)= a · b` on the calling thread, for small products inside parallel loops.
pub fn matmul_serial(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    assert_eq!(c.len(), a.rows * b.cols, "output size");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    gemm_f32(a, b, c, accumulate, gemm::Parallelism::None)
}

fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_f32(a, b, c, accumulate, parallelism)
}

fn gemm_f32(a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool, parallelism: gemm::Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Indexing the last element of each view proves the strides stay inside the slices, which
    // is what makes the raw-pointer call below sound.
    let _ = a.at(m - 1, k - 1);
    let _ = b.at(k - 1, n - 1);
    // SAFETY: every index the product touches is within the three slices (checked above and by
    // the caller's size assertion on `c`), and `c` does not alias the inputs (`&mut`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A bf16-rounded copy of a view, in the view's own memory order: rounding a transposed matrix
/// element by element in its logical order would stride across the whole buffer.
pub struct Rounded {
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Rounded {
    pub fn of(m: MatRef) -> Self {
        let row_major = m.row_stride == m.cols && m.col_stride == 1;
        let column_major = m.col_stride == m.rows && m.row_stride == 1;
        let mut values = vec![0f32; m.rows * m.cols];
        let (row_stride, col_stride) = if row_major || column_major {
            values
                .par_chunks_mut(1 << 14)
                .zip(m.data[..m.rows * m.cols].par_chunks(1 << 14))
                .for_each(|(out, src)| round_slice(src, out));
            (m.row_stride, m.col_stride)
        } else {
            // A sparse view (a block of a bigger matrix): gather it row-major.
            values
                .par_chunks_mut(m.cols.max(1))
                .enumerate()
                .for_each(|(i, row)| {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = round_to_bf16(m.at(i, j));
                    }
                });
            (m.cols, 1)
        };
        Self {
            values,
            rows: m.rows,
            cols: m.cols,
            row_stride,
            col_stride,
        }
    }

    fn view(&self) -> MatRef<'_> {
        MatRef {
            data: &self.values,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

crate::cpu::vmath::simd_kernel! {
    pub(super) fn round_slice(src: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(src) {
            *o = round_to_bf16(x);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// The textbook product in f64, operands rounded as `operands` says.
    pub(crate) fn reference(operands: Operands, a: MatRef, b: MatRef) -> Vec<f32> {
        let round = |x: f32| match operands {
            Operands::F32 => x,
            Operands::Bf16 => round_to_bf16(x),
        };
        let mut c = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| round(a.at(i, p)) as f64 * round(b.at(p, j)) as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn bf16_rounding_is_round_to_nearest_even() {
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_to_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_to_bf16(-1.0 - 1.0 / 128.0), -1.0 - 1.0 / 128.0);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        let x = 0.1f32;
        assert_eq!(round_to_bf16(x), half::bf16::from_f32(x).to_f32());
    }

    #[test]
    fn products_match_the_textbook_in_every_layout_and_precision() {
        for operands in [Operands::F32, Operands::Bf16] {
            for &(m, k, n) in &[(1, 1, 1), (5, 7, 3), (33, 70, 37), (64, 96, 48)] {
                let a_data = random(m * k, 1);
                let b_data = random(k * n, 2);
                // Transposed storage exercises the strided reads.
                let a_t: Vec<f32> = (0..k * m).map(|x| a_data[(x % m) * k + x / m]).collect();
                let b_t: Vec<f32> = (0..n * k).map(|x| b_data[(x % k) * n + x / k]).collect();
                // A block of a wider matrix: neither row- nor column-major contiguous.
                let b_wide: Vec<f32> = (0..k * (n + 3))
                    .map(|x| {
                        let (row, col) = (x / (n + 3), x % (n + 3));
                        if col < n {
                            b_data[row * n + col]
                        } else {
                            f32::NAN
                        }
                    })
                    .collect();
                let b_block = MatRef {
                    data: &b_wide,
                    rows: k,
                    cols: n,
                    row_stride: n + 3,
                    col_stride: 1,
                };
                let layouts = [
                    (
                        MatRef::row_major(&a_data, m, k),
                        MatRef::row_major(&b_data, k, n),
                    ),
                    (
                        MatRef::row_major(&a_t, k, m).t(),
                        MatRef::row_major(&b_t, n, k).t(),
                    ),
                    (MatRef::row_major(&a_data, m, k), b_block),
                ];
                for (a, b) in layouts {
                    let expected = reference(operands, a, b);
                    let mut c = vec![f32::NAN; m * n];
                    matmul(operands, a, b, &mut c, false);
                    let mut twice = c.clone();
                    matmul(operands, a, b, &mut twice, true);
                    if operands == Operands::Bf16 {
                        // The portable path too, whether or not this machine has AMX.
                        let mut portable = vec![f32::NAN; m * n];
                        matmul_prepared(a, &Rhs::rounded(b), &mut portable, false);
                        for (x, y) in portable.iter().zip(&expected) {
                            assert!((x - y).abs() <= 1e-5 * (k as f32), "portable {x} vs {y}");
                        }
                    }
                    for ((x, y), z) in c.iter().zip(&expected).zip(&twice) {
                        assert!(
                            (x - y).abs() <= 1e-5 * (k as f32),
                            "{operands:?} {x} vs {y}"
                        );
                        assert!((z - 2.0 * y).abs() <= 2e-5 * (k as f32), "accumulate");
                    }
                }
            }
        }
    }
}
