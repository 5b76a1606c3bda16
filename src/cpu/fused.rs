//! Fused CPU ops with hand-written backward passes, for fp32 activations on the CPU: LayerNorm,
//! GPT-J's attention core, gelu_new, softmax, and the linear layer (fp32 or bf16 operands).
//!
//! candle builds LayerNorm and attention out of a dozen element-wise graph nodes, each
//! allocating an activation-sized (for attention, score-sized: batch × heads × seq²) tensor
//! forward and several more backward. On a CPU that traffic costs more than the arithmetic, so
//! these ops make one pass each way. Reductions use fixed blocks summed in order, so results do
//! not depend on thread scheduling (exact resume relies on it). Every op is checked against
//! the composite it replaces in the tests below.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{self, matmul_serial, MatRef, Operands};
use super::vmath::{exp_shifted_in_place, lane_max, lane_sum, simd_kernel, tanh};

/// The values of a CPU tensor, contiguous.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// The linear layer `x · Wᵀ (+ b)` on fp32 CPU tensors, `x` `[rows, in]`, `W` `[out, in]`, in the
/// given operand precision (bf16 operands round both sides, as autocast does). One node instead
/// of candle's matmul, transpose and broadcast add: the bias is the product's starting value,
/// and the backward makes `dx = dy · W`, `dW = dyᵀ · x` and `db = Σ dy` in one call, reading
/// the tensors in place, with `dW` already in the weight's layout.
pub struct LinearOp {
    pub operands: Operands,
}

impl LinearOp {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = x.1.shape().dims2()?;
        let (n, w_k) = w.1.shape().dims2()?;
        if k != w_k {
            candle_core::bail!("linear: input width {k}, weight width {w_k}");
        }
        let x = MatRef::row_major(contiguous_f32(x.0, x.1)?, rows, k);
        let w = MatRef::row_major(contiguous_f32(w.0, w.1)?, n, k);
        let mut out = zeroed(rows * n);
        if let Some((storage, layout)) = bias {
            let bias = contiguous_f32(storage, layout)?;
            if bias.len() != n {
                candle_core::bail!("linear: {} bias values for {n} outputs", bias.len());
            }
            out.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bias));
        }
        gemm::matmul(self.operands, x, w.t(), &mut out, bias.is_some());
        Ok((CpuStorage::F32(out), (rows, n).into()))
    }

    /// `dx`, and `dW` / `db` for a weight / bias autograd tracks (a frozen one gets none: its
    /// product would be a third of the layer's backward, thrown away).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        grad_out: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let ((rows, k), n) = (x.dims2()?, w.dim(0)?);
        let mut grad_x = zeroed(rows * k);
        let mut grad_w = w.track_op().then(|| zeroed(n * k));
        let mut grad_b = bias.filter(|b| b.track_op()).map(|_| zeroed(n));
        with_values(grad_out, |dy| {
            let dy_rows = MatRef::row_major(dy, rows, n);
            with_values(w, |w| {
                let w = MatRef::row_major(w, n, k);
                gemm::matmul(self.operands, dy_rows, w, &mut grad_x, false);
                Ok(())
            })?;
            if let Some(grad_w) = grad_w.as_mut() {
                with_values(x, |x| {
                    let x = MatRef::row_major(x, rows, k);
                    gemm::matmul(self.operands, dy_rows.t(), x, grad_w, false);
                    Ok(())
                })?;
            }
            if let Some(grad_b) = grad_b.as_mut() {
                add_column_sums(dy, n, grad_b);
            }
            Ok(())
        })?;
        let device = x.device();
        Ok((
            Tensor::from_vec(grad_x, (rows, k), device)?,
            grad_w
                .map(|g| Tensor::from_vec(g, (n, k), device))
                .transpose()?,
            grad_b.map(|b| Tensor::from_vec(b, n, device)).transpose()?,
        ))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, x_layout), (w, w_layout), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w, _) = self.backward(x, w, None, grad_out)?;
        Ok((Some(grad_x), grad_w))
    }
}

/// `x · Wᵀ` for fp32 `x` `[rows, in]` and a frozen half-precision `W` `[out, in]` (bf16 or fp16):
/// `W` is widened to fp32 inside the op, for this product only, so a model stored in half
/// precision never exists whole in fp32, and autograd holds on to the half original. The
/// backward makes `dx = dy · W` only: a frozen weight gets no gradient.
pub struct FrozenLinearOp {
    pub operands: Operands,
}

/// A contiguous half-precision (or fp32) CPU weight as fp32 values.
fn widened(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen linear: the weight is not contiguous");
    };
    Ok(match storage {
        CpuStorage::BF16(values) => values[start..end].par_iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F16(values) => values[start..end].par_iter().map(|v| v.to_f32()).collect(),
        CpuStorage::F32(values) => values[start..end].to_vec(),
        _ => candle_core::bail!("frozen linear: the weight must be bf16, fp16 or fp32"),
    })
}

impl candle_core::CustomOp2 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = x_layout.shape().dims2()?;
        let (n, w_k) = w_layout.shape().dims2()?;
        if k != w_k {
            candle_core::bail!("linear: input width {k}, weight width {w_k}");
        }
        let w = widened(w, w_layout)?;
        let x = MatRef::row_major(contiguous_f32(x, x_layout)?, rows, k);
        let mut out = zeroed(rows * n);
        gemm::matmul(
            self.operands,
            x,
            MatRef::row_major(&w, n, k).t(),
            &mut out,
            false,
        );
        Ok((CpuStorage::F32(out), (rows, n).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((rows, k), n) = (x.dims2()?, w.dim(0)?);
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("frozen linear: the weight is not on the CPU");
        };
        let w = widened(storage, layout)?;
        let mut grad_x = zeroed(rows * k);
        with_values(grad_out, |dy| {
            let dy = MatRef::row_major(dy, rows, n);
            gemm::matmul(
                self.operands,
                dy,
                MatRef::row_major(&w, n, k),
                &mut grad_x,
                false,
            );
            Ok(())
        })?;
        Ok((Some(Tensor::from_vec(grad_x, (rows, k), x.device())?), None))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, x_layout), (w, w_layout), Some((b, b_layout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w, grad_b) = self.backward(x, w, Some(b), grad_out)?;
        Ok((Some(grad_x), grad_w, grad_b))
    }
}

/// Runs `f` on a CPU fp32 tensor's values, borrowed in place when contiguous.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(storage) = &*storage {
            return f(contiguous_f32(storage, layout)?);
        }
    }
    f(&values(t)?)
}

/// A zero-filled buffer, written by all threads: a serial memset of a large buffer leaves the
/// other cores idle.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    buffer.par_extend(rayon::iter::repeat_n(0f32, len));
    buffer
}

/// `sums[j] += Σ_r rows[r][j]` over row-major rows of `width`, in parallel over column blocks;
/// each column is summed in row order, so the result does not depend on the thread count.
pub(crate) fn add_column_sums(rows: &[f32], width: usize, sums: &mut [f32]) {
    const BLOCK: usize = 2048;
    sums.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, sums)| {
            let first = block * BLOCK;
            for row in rows.chunks_exact(width) {
                let row = &row[first..first + sums.len()];
                sums.iter_mut().zip(row).for_each(|(acc, x)| *acc += x);
            }
        });
}

pub struct GeluNew;

simd_kernel! {
    pub(super) fn gelu_forward(xs: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = 0.5 * x * (1.0 + tanh(SQRT_TWO_OVER_PI * (x + GELU_COEF * x * x * x)));
        }
    }
}

simd_kernel! {
    pub(super) fn gelu_backward(xs: &[f32], grads: &[f32], dx: &mut [f32]) {
        for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(grads) {
            let t = tanh(SQRT_TWO_OVER_PI * (x + GELU_COEF * x * x * x));
            let inner = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_COEF * x * x);
            *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner);
        }
    }
}

simd_kernel! {
    /// Each `width`-long row of `scores` becomes `softmax(row / scale + mask row)`.
    pub(super) fn masked_softmax_rows(
        scores: &mut [f32],
        mask: Option<&[f32]>,
        scale: f32,
        width: usize,
    ) {
        for (r, row) in scores.chunks_exact_mut(width).enumerate() {
            match mask {
                Some(mask) => {
                    let mask = &mask[r * width..][..width];
                    row.iter_mut().zip(mask).for_each(|(s, m)| *s = *s / scale + m);
                }
                None if scale != 1.0 => row.iter_mut().for_each(|s| *s /= scale),
                None => {}
            }
            let max = lane_max(row);
            let sum = exp_shifted_in_place(row, max);
            row.iter_mut().for_each(|s| *s /= sum);
        }
    }
}

simd_kernel! {
    /// Rows of `dp` become `P ∘ (dP - rowsum(dP ∘ P)) / scale`: softmax's backward, then the
    /// scores' scaling.
    pub(super) fn softmax_backward_rows(dp: &mut [f32], probs: &[f32], scale: f32, width: usize) {
        let mut products = vec![0f32; width];
        for (dp, p) in dp.chunks_exact_mut(width).zip(probs.chunks_exact(width)) {
            products.iter_mut().zip(dp.iter().zip(p)).for_each(|(o, (a, b))| *o = a * b);
            let dot = lane_sum(&products);
            for (g, &p) in dp.iter_mut().zip(p) {
                *g = p * (*g - dot) / scale;
            }
        }
    }
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044_715;

impl candle_core::CustomOp1 for GeluNew {
    fn name(&self) -> &'static str {
        "gelu-new"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let xs = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(4096)
            .zip(xs.par_chunks(4096))
            .for_each(|(out, xs)| gelu_forward(xs, out));
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let grad_res = grad_res.contiguous()?;
        let (x_storage, x_layout) = arg.storage_and_layout();
        let (g_storage, g_layout) = grad_res.storage_and_layout();
        let (candle_core::Storage::Cpu(x), candle_core::Storage::Cpu(g)) =
            (&*x_storage, &*g_storage)
        else {
            candle_core::bail!("the fused gelu runs on the CPU only");
        };
        let (x, g) = (contiguous_f32(x, x_layout)?, contiguous_f32(g, g_layout)?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(g.par_chunks(4096)))
            .for_each(|(dx, (x, g))| gelu_backward(x, g, dx));
        Ok(Some(Tensor::from_vec(dx, x_layout.shape(), arg.device())?))
    }
}

pub struct SoftmaxLastDim;

/// The elements of a contiguous fp32 CPU tensor, for the fused CPU ops.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("the fused CPU ops need contiguous inputs"),
    }
}

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let xs = contiguous_f32(storage, layout)?;
        let dim = *layout.dims().last().expect("softmax input has a last dim");
        let mut out = xs.to_vec();
        out.par_chunks_mut(dim)
            .for_each(|row| masked_softmax_rows(row, None, 1.0, dim));
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }

    /// With y = softmax(x): dx = y * (dy - sum(dy * y)) per row.
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let grad_res = grad_res.contiguous()?;
        let (y_storage, y_layout) = res.storage_and_layout();
        let (g_storage, g_layout) = grad_res.storage_and_layout();
        let (candle_core::Storage::Cpu(y), candle_core::Storage::Cpu(g)) =
            (&*y_storage, &*g_storage)
        else {
            candle_core::bail!("the fused softmax runs on the CPU only");
        };
        let (y, g) = (contiguous_f32(y, y_layout)?, contiguous_f32(g, g_layout)?);
        let dim = *y_layout
            .dims()
            .last()
            .expect("softmax output has a last dim");
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(dim)
            .zip(y.par_chunks(dim).zip(g.par_chunks(dim)))
            .for_each(|(out, (y, g))| {
                out.copy_from_slice(g);
                softmax_backward_rows(out, y, 1.0, dim);
            });
        Ok(Some(Tensor::from_vec(dx, y_layout.shape(), res.device())?))
    }
}

/// Fixed row blocks for the parameter-gradient reductions.
const REDUCTION_BLOCKS: usize = 16;

/// LayerNorm over the last dim: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub struct LayerNormOp {
    pub eps: f64,
}

/// Mean and `1 / sqrt(var + eps)` of one row.
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = lane_sum(row) / d;
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l += (x - mean) * (x - mean);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum();
    let var = (tail + lanes.iter().sum::<f32>()) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

simd_kernel! {
    pub(super) fn layer_norm_rows(xs: &[f32], w: &[f32], b: &[f32], out: &mut [f32], eps: f32) {
        let d = w.len();
        for (out, row) in out.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
            let (mean, rstd) = row_stats(row, eps);
            for (((o, &x), &w), &b) in out.iter_mut().zip(row).zip(w).zip(b) {
                *o = (x - mean) * rstd * w + b;
            }
        }
    }
}

simd_kernel! {
    /// Rows' input gradients into `dx`; their weight and bias gradients added to `dw`, `db`.
    pub(super) fn layer_norm_backward_rows(
        xs: &[f32],
        dys: &[f32],
        w: &[f32],
        eps: f32,
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) {
        let d = w.len();
        let (mut xhat, mut g) = (vec![0f32; d], vec![0f32; d]);
        for ((dx, x), dy) in dx.chunks_exact_mut(d).zip(xs.chunks_exact(d)).zip(dys.chunks_exact(d)) {
            let (mean, rstd) = row_stats(x, eps);
            for j in 0..d {
                xhat[j] = (x[j] - mean) * rstd;
                g[j] = dy[j] * w[j];
                dw[j] += dy[j] * xhat[j];
                db[j] += dy[j];
            }
            let mean_g = lane_sum(&g) / d as f32;
            g.iter_mut().zip(&xhat).for_each(|(g, x)| *g *= x);
            let mean_gx = lane_sum(&g) / d as f32;
            for j in 0..d {
                dx[j] = rstd * (dy[j] * w[j] - mean_g - xhat[j] * mean_gx);
            }
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout)?;
        let (w, b) = (contiguous_f32(w, w_layout)?, contiguous_f32(b, b_layout)?);
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        let eps = self.eps as f32;
        out.par_chunks_mut(64 * d)
            .zip(x.par_chunks(64 * d))
            .for_each(|(out, rows)| layer_norm_rows(rows, w, b, out, eps));
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, dys) = (values(x)?, values(w)?, values(grad_out)?);
        let d = ws.len();
        let rows = xs.len() / d;
        let mut dx = vec![0f32; xs.len()];
        let block_rows = rows.div_ceil(REDUCTION_BLOCKS).max(1);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(block_rows * d)
            .zip(
                xs.par_chunks(block_rows * d)
                    .zip(dys.par_chunks(block_rows * d)),
            )
            .map(|(dx, (x, dy))| {
                let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                layer_norm_backward_rows(x, dy, &ws, self.eps as f32, dx, &mut dw, &mut db);
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pw, pb) in &partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dw, d, device)?),
            Some(Tensor::from_vec(db, d, device)?),
        ))
    }
}

/// The self-attention core on `q`, `k`, `v` as the projections give them
/// (`[batch, seq, heads, head_dim]`): rotary on the first `rotary_dim` dims of q and k, scores
/// `q·kᵀ / score_divisor` plus the additive mask, softmax, times v. The output has the input
/// layout, so merging heads is a reshape. Backward recomputes the probabilities per
/// (batch, head) instead of keeping score-sized tensors alive.
pub struct CausalSelfAttention {
    /// `[batch × seq, rotary_dim / 2]`: the sin and cos of each token's position.
    pub sin: Vec<f32>,
    pub cos: Vec<f32>,
    /// `[batch, seq, seq]` additive mask (0 or the most negative float).
    pub mask: Vec<f32>,
    /// 0 for no rotary embedding.
    pub rotary_dim: usize,
    pub pairs: RotaryPairs,
    /// What scores are divided by (`sqrt(head_dim)` for most models).
    pub score_divisor: f32,
    /// Dropout on the probabilities in training: the rate and one seed per (batch row, head),
    /// `[batch × heads]`; the backward draws the same factors again ([`dropout_factors`]).
    pub dropout: Option<(f64, Vec<u64>)>,
}

/// splitmix64's finaliser: nearby inputs give unrelated 64-bit outputs.
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The factors dropout multiplies `n` values by: 0 with probability `p`, else `1 / (1 - p)`.
/// Value `i` is decided by a hash of `(seed, i)` alone (splitmix64): a mask is the same on any
/// machine and in any Kiln version, and costs one multiply-xorshift round per value. Shared by
/// every dropout site so that its masks have one definition.
pub fn dropout_factors(seed: u64, p: f64, n: usize) -> Vec<f32> {
    let keep = (1.0 / (1.0 - p)) as f32;
    // Drop when the top 53 bits, as a fraction of 2^53, fall below p.
    let threshold = (p * (1u64 << 53) as f64) as u64;
    (0..n as u64)
        .map(|i| {
            let z = splitmix64(seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            if z >> 11 < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

/// Which dims of a head the rotary embedding turns together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryPairs {
    /// (0, 1), (2, 3), ...: GPT-J's `rotate_every_two`.
    Interleaved,
    /// (i, i + rotary_dim / 2): GPT-NeoX's `rotate_half`.
    Halves,
}

#[derive(Clone, Copy)]
enum Rotation {
    None,
    Forward,
    Inverse,
}

struct Dims {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

impl CausalSelfAttention {
    fn dims(shape: &Shape) -> Result<Dims> {
        let (b, t, h, d) = shape.dims4()?;
        Ok(Dims { b, t, h, d })
    }

    /// One head's rows of `x` (`[t, d]`, strided inside `[b, t, h, d]`), rotated as asked.
    fn head(&self, x: &[f32], dims: &Dims, bi: usize, hi: usize, rotation: Rotation) -> Vec<f32> {
        let Dims { t, h, d, .. } = *dims;
        self.rows(x, (bi * t * h + hi) * d, h * d, dims, bi, rotation)
    }

    /// `t` rows of `d` values, the i-th at `x[offset + i * stride..]`, copied out and rotated
    /// with the positions of batch row `bi`.
    fn rows(
        &self,
        x: &[f32],
        offset: usize,
        stride: usize,
        dims: &Dims,
        bi: usize,
        rotation: Rotation,
    ) -> Vec<f32> {
        let Dims { t, d, .. } = *dims;
        let half = self.rotary_dim / 2;
        let mut out = vec![0f32; t * d];
        for ti in 0..t {
            let src = &x[offset + ti * stride..][..d];
            let dst = &mut out[ti * d..][..d];
            dst.copy_from_slice(src);
            let table = (bi * t + ti) * half;
            for p in 0..half {
                let (sin, cos) = (self.sin[table + p], self.cos[table + p]);
                let (i, j) = match self.pairs {
                    RotaryPairs::Interleaved => (2 * p, 2 * p + 1),
                    RotaryPairs::Halves => (p, p + half),
                };
                let (first, second) = (src[i], src[j]);
                match rotation {
                    Rotation::None => break,
                    Rotation::Forward => {
                        dst[i] = first * cos - second * sin;
                        dst[j] = second * cos + first * sin;
                    }
                    // The transpose of the rotation, for gradients.
                    Rotation::Inverse => {
                        dst[i] = first * cos + second * sin;
                        dst[j] = second * cos - first * sin;
                    }
                }
            }
        }
        out
    }

    /// Softmax probabilities `[t, t]` of one (batch, head) from its rotated q and k.
    fn probabilities(&self, q: &[f32], k: &[f32], dims: &Dims, bi: usize) -> Vec<f32> {
        let Dims { t, d, .. } = *dims;
        let mut scores = vec![0f32; t * t];
        matmul_serial(
            MatRef::row_major(q, t, d),
            MatRef::row_major(k, t, d).t(),
            &mut scores,
            false,
        );
        let mask = &self.mask[bi * t * t..][..t * t];
        masked_softmax_rows(&mut scores, Some(mask), self.score_divisor, t);
        scores
    }

    /// Dropout factors of (batch, head) `bh`'s `[t, t]` probabilities, if training drops any.
    fn dropout_factors(&self, bh: usize, t: usize) -> Option<Vec<f32>> {
        let (p, seeds) = self.dropout.as_ref()?;
        Some(dropout_factors(seeds[bh], *p, t * t))
    }

    /// Writes one head's `[t, d]` rows into `[b, t, h, d]`.
    fn scatter(out: &mut [f32], head: &[f32], dims: &Dims, bi: usize, hi: usize) {
        let Dims { t, h, d, .. } = *dims;
        for ti in 0..t {
            out[((bi * t + ti) * h + hi) * d..][..d].copy_from_slice(&head[ti * d..][..d]);
        }
    }
}

impl CustomOp3 for CausalSelfAttention {
    fn name(&self) -> &'static str {
        "causal-self-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Self::dims(q_layout.shape())?;
        if k_layout.shape() != q_layout.shape() || v_layout.shape() != q_layout.shape() {
            candle_core::bail!("attention: q, k and v shapes differ");
        }
        let (q, k, v) = (
            contiguous_f32(q, q_layout)?,
            contiguous_f32(k, k_layout)?,
            contiguous_f32(v, v_layout)?,
        );
        let Dims { b, t, h, d } = dims;
        let heads: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let (bi, hi) = (bh / h, bh % h);
                let qr = self.head(q, &dims, bi, hi, Rotation::Forward);
                let kr = self.head(k, &dims, bi, hi, Rotation::Forward);
                let mut probs = self.probabilities(&qr, &kr, &dims, bi);
                if let Some(factors) = self.dropout_factors(bh, t) {
                    probs.iter_mut().zip(&factors).for_each(|(p, f)| *p *= f);
                }
                let vh = self.head(v, &dims, bi, hi, Rotation::None);
                let mut out = vec![0f32; t * d];
                matmul_serial(
                    MatRef::row_major(&probs, t, t),
                    MatRef::row_major(&vh, t, d),
                    &mut out,
                    false,
                );
                out
            })
            .collect();
        let mut out = vec![0f32; b * t * h * d];
        for (bh, head) in heads.iter().enumerate() {
            Self::scatter(&mut out, head, &dims, bh / h, bh % h);
        }
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Self::dims(q.shape())?;
        let (qs, ks, vs, dos) = (values(q)?, values(k)?, values(v)?, values(grad_out)?);
        let Dims { b, t, h, d } = dims;
        let scale = self.score_divisor;
        let grads: Vec<[Vec<f32>; 3]> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let (bi, hi) = (bh / h, bh % h);
                let qr = self.head(&qs, &dims, bi, hi, Rotation::Forward);
                let kr = self.head(&ks, &dims, bi, hi, Rotation::Forward);
                let vh = self.head(&vs, &dims, bi, hi, Rotation::None);
                let dout = self.head(&dos, &dims, bi, hi, Rotation::None);
                let probs = self.probabilities(&qr, &kr, &dims, bi);
                let factors = self.dropout_factors(bh, t);
                let dropped: Vec<f32> = match &factors {
                    Some(f) => probs.iter().zip(f).map(|(p, f)| p * f).collect(),
                    None => probs.clone(),
                };
                let p = MatRef::row_major(&dropped, t, t);
                let mut dv = vec![0f32; t * d];
                matmul_serial(p.t(), MatRef::row_major(&dout, t, d), &mut dv, false);
                let mut dp = vec![0f32; t * t];
                matmul_serial(
                    MatRef::row_major(&dout, t, d),
                    MatRef::row_major(&vh, t, d).t(),
                    &mut dp,
                    false,
                );
                if let Some(f) = &factors {
                    dp.iter_mut().zip(f).for_each(|(g, f)| *g *= f);
                }
                softmax_backward_rows(&mut dp, &probs, scale, t);
                let ds = MatRef::row_major(&dp, t, t);
                let (mut dq, mut dk) = (vec![0f32; t * d], vec![0f32; t * d]);
                matmul_serial(ds, MatRef::row_major(&kr, t, d), &mut dq, false);
                matmul_serial(ds.t(), MatRef::row_major(&qr, t, d), &mut dk, false);
                let unrotate = |g: Vec<f32>| self.rows(&g, 0, d, &dims, bi, Rotation::Inverse);
                [unrotate(dq), unrotate(dk), dv]
            })
            .collect();
        let mut out = [
            vec![0f32; b * t * h * d],
            vec![0f32; b * t * h * d],
            vec![0f32; b * t * h * d],
        ];
        for (bh, head_grads) in grads.iter().enumerate() {
            for (o, g) in out.iter_mut().zip(head_grads) {
                Self::scatter(o, g, &dims, bh / h, bh % h);
            }
        }
        let [dq, dk, dv] = out;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, q.shape(), device)?),
            Some(Tensor::from_vec(dv, q.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let values = super::super::gemm::tests::random(shape.iter().product(), seed);
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Output and the gradients of `sum(output · r)` for a random `r`, fused vs composite.
    fn compare(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        composite: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        tolerance: f32,
    ) {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (ours, theirs) = (fused(&tensors).unwrap(), composite(&tensors).unwrap());
        assert!(max_diff(&ours, &theirs) < tolerance, "outputs differ");
        let r = random(ours.dims(), 99);
        let grads_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads_theirs = (theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (
                grads_ours.get(v).expect("fused gradient"),
                grads_theirs.get(v).expect("composite gradient"),
            );
            let diff = max_diff(a, b);
            assert!(diff < tolerance, "gradient of input {i} differs by {diff}");
        }
    }

    #[test]
    fn layer_norm_matches_the_composite() {
        let inputs = [
            Var::from_tensor(&random(&[3, 5, 24], 1)).unwrap(),
            Var::from_tensor(&(random(&[24], 2) + 1.0).unwrap()).unwrap(),
            Var::from_tensor(&random(&[24], 3)).unwrap(),
        ];
        compare(
            &inputs,
            |t| t[0].apply_op3(&t[1], &t[2], LayerNormOp { eps: 1e-5 }),
            |t| {
                let centered = t[0].broadcast_sub(&t[0].mean_keepdim(D::Minus1)?)?;
                let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
                centered
                    .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])
            },
            1e-5,
        );
    }

    /// The attention core from candle primitives: GPT-J's interleaved rotary on the first
    /// `rotary` dims, masked softmax, times v.
    fn composite_attention(
        t: &[Tensor],
        sin: &Tensor,
        cos: &Tensor,
        mask: &Tensor,
        rotary: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, s, h, d) = t[0].dims4()?;
        let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
            let pairs = x.narrow(3, 0, rotary)?.reshape((b, s, h, rotary / 2, 2))?;
            let even = pairs.narrow(4, 0, 1)?.squeeze(4)?;
            let odd = pairs.narrow(4, 1, 1)?.squeeze(4)?;
            let rotated = Tensor::stack(
                &[
                    (even.broadcast_mul(cos)? - odd.broadcast_mul(sin)?)?,
                    (odd.broadcast_mul(cos)? + even.broadcast_mul(sin)?)?,
                ],
                4,
            )?
            .reshape((b, s, h, rotary))?;
            Tensor::cat(&[rotated, x.narrow(3, rotary, d - rotary)?], 3)
        };
        let q = rotate(&t[0])?.transpose(1, 2)?.contiguous()?;
        let k = rotate(&t[1])?.transpose(1, 2)?.contiguous()?;
        let v = t[2].transpose(1, 2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs.matmul(&v)?.transpose(1, 2)?.contiguous()
    }

    #[test]
    fn attention_matches_the_composite_with_padding_and_partial_rotary() {
        let (b, s, h, d, rotary) = (2, 7, 3, 8, 4);
        let inputs = [
            Var::from_tensor(&random(&[b, s, h, d], 4)).unwrap(),
            Var::from_tensor(&random(&[b, s, h, d], 5)).unwrap(),
            Var::from_tensor(&random(&[b, s, h, d], 6)).unwrap(),
        ];
        // Row 1 has two padding positions at the end; row 0 starts at position 3.
        let positions: Vec<usize> = (0..s).map(|i| i + 3).chain(0..s).collect();
        let mut mask = vec![0f32; b * s * s];
        for row in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (row == 1 && j >= s - 2) {
                        mask[(row * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..rotary / 2).map(move |i| p as f32 / (1.0 + i as f32)))
            .collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let table = |v: &[f32]| Tensor::from_vec(v.to_vec(), (b, s, 1, rotary / 2), &Device::Cpu);
        let (sin_t, cos_t) = (table(&sin).unwrap(), table(&cos).unwrap());
        let mask_t = Tensor::from_vec(mask.clone(), (b, 1, s, s), &Device::Cpu).unwrap();
        compare(
            &inputs,
            |t| {
                let op = CausalSelfAttention {
                    sin: sin.clone(),
                    cos: cos.clone(),
                    mask: mask.clone(),
                    rotary_dim: rotary,
                    pairs: RotaryPairs::Interleaved,
                    score_divisor: (d as f32).sqrt(),
                    dropout: None,
                };
                t[0].apply_op3(&t[1], &t[2], op)
            },
            |t| composite_attention(t, &sin_t, &cos_t, &mask_t, rotary),
            1e-5,
        );
    }

    #[test]
    fn gelu_and_softmax_match_candle() {
        let x = [Var::from_tensor(&(random(&[6, 40], 7) * 4.0).unwrap()).unwrap()];
        compare(&x, |t| t[0].apply_op1(GeluNew), |t| t[0].gelu(), 1e-5);
        compare(
            &x,
            |t| t[0].apply_op1(SoftmaxLastDim),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            1e-6,
        );
    }

    #[test]
    fn linear_matches_matmul_plus_bias() {
        let inputs = [
            Var::from_tensor(&random(&[37, 40], 8)).unwrap(),
            Var::from_tensor(&random(&[2100, 40], 9)).unwrap(),
            Var::from_tensor(&random(&[2100], 10)).unwrap(),
        ];
        let op = || LinearOp {
            operands: Operands::F32,
        };
        compare(
            &inputs,
            |t| t[0].apply_op3(&t[1], &t[2], op()),
            |t| t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2]),
            1e-4,
        );
        compare(
            &inputs[..2],
            |t| t[0].apply_op2(&t[1], op()),
            |t| t[0].matmul(&t[1].t()?),
            1e-4,
        );
    }

    #[test]
    fn bf16_linear_is_the_product_of_rounded_operands() {
        let inputs = [
            Var::from_tensor(&random(&[37, 40], 8)).unwrap(),
            Var::from_tensor(&random(&[29, 40], 9)).unwrap(),
        ];
        let op = || LinearOp {
            operands: Operands::Bf16,
        };
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let x = inputs[0].as_tensor();
        let w = inputs[1].as_tensor();
        let ours = x.apply_op2(w, op()).unwrap();
        let rounded = round(x)
            .unwrap()
            .matmul(&round(w).unwrap().t().unwrap())
            .unwrap();
        assert!(max_diff(&ours, &rounded) < 1e-5, "forward");
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&ours, &exact) > 1e-4, "operands were not rounded");
        // Gradients: those of the fp32 product, up to the bf16 rounding of all three operands.
        compare(
            &inputs,
            |t| t[0].apply_op2(&t[1], op()),
            |t| t[0].matmul(&t[1].t()?),
            0.03,
        );
    }
}
