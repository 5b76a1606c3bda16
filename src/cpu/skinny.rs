//! `x · Wᵀ` for the few-row inputs of incremental decoding (one row per sequence being
//! generated), on CPU in fp32.
//!
//! A general GEMM repacks the whole weight matrix on every call; at one to a few dozen rows that
//! repacking costs more than the arithmetic (for GPT-J's 50400 × d lm_head it is most of a decode
//! step). Here every weight row is read once, straight from where it lies, and multiplied with
//! all input rows while it is in L1.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fused::contiguous_f32;
use super::vmath::Isa;

/// Inputs with at most this many rows take this path; larger ones are GEMM's job.
pub const MAX_ROWS: usize = 32;

/// Below this many multiply-adds a call runs on one thread (threads cost more than they save).
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// `x · wᵀ` for a 2-D `x` of at most [`MAX_ROWS`] rows, when this path applies: fp32 on CPU,
/// contiguous, and no gradient wanted (it has no backward). `None` means "use matmul".
pub fn try_matmul_transposed(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let applies = std::env::var_os("NOSKINNY").is_none()
        && x.dim(0)? <= MAX_ROWS
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.device().is_cpu()
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op();
    if !applies {
        return Ok(None);
    }
    x.contiguous()?.apply_op2_no_bwd(w, &SkinnyOp).map(Some)
}

struct SkinnyOp;

impl CustomOp2 for SkinnyOp {
    fn name(&self) -> &'static str {
        "skinny-matmul-transposed"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        x_layout: &Layout,
        ws: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = x_layout.shape().dims2()?;
        let (n, k_w) = w_layout.shape().dims2()?;
        if k != k_w {
            candle_core::bail!("skinny matmul: input has {k} columns, weight {k_w}");
        }
        let (x, w) = (contiguous_f32(xs, x_layout)?, contiguous_f32(ws, w_layout)?);
        let y = matmul_transposed(x, rows, w, n, k);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

/// `y[m][n] = Σ_k x[m][k] · w[n][k]` with `x`: `rows × k` and `w`: `n × k`, both row-major.
pub fn matmul_transposed(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k);
    assert_eq!(w.len(), n * k);
    // Chosen once on the calling thread: in unit tests, the variant `Isa::run` forces there.
    let isa = Isa::selected();
    let mut y: Vec<f32> = Vec::with_capacity(rows * n);
    let weights_per_task = if rows * n * k < PARALLEL_MIN_WORK {
        n.max(1)
    } else {
        // A few tasks per thread evens out uneven progress.
        let tasks = rayon::current_num_threads() * 4;
        n.div_ceil(tasks).div_ceil(16) * 16
    };
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(weights_per_task))
        .into_par_iter()
        .for_each(|task| {
            let first = task * weights_per_task;
            let count = weights_per_task.min(n - first);
            // SAFETY: tasks write disjoint columns [first, first + count) of y (rows × n), and
            // read w's rows [first, first + count); both are in bounds.
            unsafe {
                let out = out.get().add(first);
                weight_range(
                    isa,
                    x,
                    rows,
                    &w[first * k..(first + count) * k],
                    count,
                    k,
                    out,
                    n,
                );
            }
        });
    // SAFETY: the tasks above wrote every element (each column j < n of each row m < rows).
    unsafe { y.set_len(rows * n) };
    y
}

/// The output buffer, shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see `matmul_transposed`: no two tasks write the same element.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Columns `0..count` of `out` (row stride `stride`) for the weight rows of `w` (count × k), in
/// the `isa` variant.
///
/// # Safety
/// `out` must be valid for writes at `m * stride + j` for `m < rows`, `j < count`, and this CPU
/// must have `isa` (as `Isa::selected` guarantees).
#[allow(clippy::too_many_arguments)]
unsafe fn weight_range(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &[f32],
    count: usize,
    k: usize,
    out: *mut f32,
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Avx512 => return simd::weight_range_avx512(x, rows, w, count, k, out, stride),
            Isa::Avx2 => return simd::weight_range_avx2(x, rows, w, count, k, out, stride),
            Isa::Portable => {}
        }
    }
    for j in 0..count {
        let wj = &w[j * k..(j + 1) * k];
        for m in 0..rows {
            let xm = &x[m * k..(m + 1) * k];
            *out.add(m * stride + j) = xm.iter().zip(wj).map(|(a, b)| a * b).sum();
        }
    }
}

/// The same loop nest for AVX2 (8 lanes, 16 registers: blocks of 4 inputs × 3 weight rows) and
/// AVX-512 (16 lanes, 32 registers: 4 × 6). Each weight block is loaded once per k step and
/// multiplied with every input row of the block; whole input blocks stay in L1.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    macro_rules! kernel {
        ($range:ident, $block:ident, $feature:literal, $vec:ty, $lanes:expr, $wb:expr,
         $zero:ident, $load:ident, $fma:ident, $half:ident) => {
            #[target_feature(enable = $feature)]
            pub unsafe fn $range(
                x: &[f32],
                rows: usize,
                w: &[f32],
                count: usize,
                k: usize,
                out: *mut f32,
                stride: usize,
            ) {
                let mut j = 0;
                while j < count {
                    let nb = ($wb).min(count - j);
                    let mut m = 0;
                    while m < rows {
                        let mb = 4.min(rows - m);
                        let xs = x.as_ptr().add(m * k);
                        let ws = w.as_ptr().add(j * k);
                        let o = out.add(m * stride + j);
                        macro_rules! go {
                            ($mb:literal) => {
                                match nb {
                                    1 => $block::<$mb, 1>(xs, ws, k, o, stride),
                                    2 => $block::<$mb, 2>(xs, ws, k, o, stride),
                                    3 => $block::<$mb, 3>(xs, ws, k, o, stride),
                                    4 => $block::<$mb, 4>(xs, ws, k, o, stride),
                                    5 => $block::<$mb, 5>(xs, ws, k, o, stride),
                                    _ => $block::<$mb, { $wb }>(xs, ws, k, o, stride),
                                }
                            };
                        }
                        match mb {
                            4 => go!(4),
                            3 => go!(3),
                            2 => go!(2),
                            _ => go!(1),
                        }
                        m += mb;
                    }
                    j += nb;
                }
            }

            /// `MB` input rows × `NB` weight rows into `out[mm * stride + jj]`.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn $block<const MB: usize, const NB: usize>(
                x: *const f32,
                w: *const f32,
                k: usize,
                out: *mut f32,
                stride: usize,
            ) {
                let mut acc: [[$vec; NB]; MB] = [[$zero(); NB]; MB];
                let mut i = 0;
                while i + $lanes <= k {
                    let mut wv: [$vec; NB] = [$zero(); NB];
                    for (jj, v) in wv.iter_mut().enumerate() {
                        *v = $load(w.add(jj * k + i));
                    }
                    for (mm, acc_row) in acc.iter_mut().enumerate() {
                        let xv = $load(x.add(mm * k + i));
                        for (a, v) in acc_row.iter_mut().zip(&wv) {
                            *a = $fma(xv, *v, *a);
                        }
                    }
                    i += $lanes;
                }
                // Horizontal sums eight at a time (one reduction per accumulator would cost a
                // third of the block at k = 256). Every lane is summed by the same tree whatever
                // the block shape, so a row's result does not depend on the rows beside it.
                let mut halves = [_mm256_setzero_ps(); 32];
                for (slot, a) in halves.iter_mut().zip(acc.iter().flatten()) {
                    *slot = $half(*a);
                }
                let mut sums = [0f32; 32];
                for g in (0..MB * NB).step_by(8) {
                    let group: &[__m256; 8] = halves[g..g + 8].try_into().expect("8 lanes");
                    _mm256_storeu_ps(sums.as_mut_ptr().add(g), sum8(group));
                }
                for mm in 0..MB {
                    for jj in 0..NB {
                        let mut sum = sums[mm * NB + jj];
                        for t in i..k {
                            sum += *x.add(mm * k + t) * *w.add(jj * k + t);
                        }
                        *out.add(mm * stride + jj) = sum;
                    }
                }
            }
        };
    }

    kernel!(
        weight_range_avx2,
        block_avx2,
        "avx2,fma",
        __m256,
        8,
        3,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        same
    );
    kernel!(
        weight_range_avx512,
        block_avx512,
        "avx512f",
        __m512,
        16,
        6,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        halve
    );

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn same(v: __m256) -> __m256 {
        v
    }

    /// The two 8-lane halves of a 16-lane vector, added.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn halve(v: __m512) -> __m256 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        _mm256_add_ps(_mm512_castps512_ps256(v), high)
    }

    /// The lane sums of eight vectors, as one vector: `[Σv0, Σv1, ..., Σv7]`, each summed as
    /// ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7)).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn sum8(v: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let low = _mm256_permute2f128_ps(u0, u1, 0x20);
        let high = _mm256_permute2f128_ps(u0, u1, 0x31);
        _mm256_add_ps(low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::vmath::variants::variant_tests;

    /// Each variant sums in its own order (lanes, then a tree), so it is held to the definition
    /// within rounding rather than to the portable bits.
    fn matches_the_definition_for_every_block_shape(isa: Isa) {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for (rows, n, k) in [
            (1, 1, 1),
            (3, 7, 13),
            (5, 10, 64),
            (16, 50, 256),
            (32, 9, 8),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let y = isa
                .run(|| matmul_transposed(&x, rows, &w, n, k))
                .unwrap_or_else(|| panic!("the {isa:?} variant cannot run on this CPU"));
            for m in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[m * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = y[m * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{isa:?}, rows {rows} n {n} k {k}: y[{m}][{j}] = {got}, want {want}"
                    );
                }
            }
        }
        eprintln!("skinny matmul_transposed: the {isa:?} variant matches the definition");
    }

    /// Batched decoding must give a sequence the tokens it gets alone.
    fn a_row_gets_the_same_bits_whatever_rows_share_the_call(isa: Isa) {
        let (rows, n, k) = (4, 5003, 256);
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 23) as f32 * -0.01).collect();
        let (y, single) = isa
            .run(|| {
                (
                    matmul_transposed(&x, rows, &w, n, k),
                    matmul_transposed(&x[..k], 1, &w, n, k),
                )
            })
            .unwrap_or_else(|| panic!("the {isa:?} variant cannot run on this CPU"));
        assert_eq!(&y[..n], &single[..], "{isa:?}");
    }

    variant_tests! {
        fn simd_variants(isa) {
            matches_the_definition_for_every_block_shape(isa);
            a_row_gets_the_same_bits_whatever_rows_share_the_call(isa);
        }
    }

    #[test]
    fn portable_variant() {
        matches_the_definition_for_every_block_shape(Isa::Portable);
        a_row_gets_the_same_bits_whatever_rows_share_the_call(Isa::Portable);
    }
}
