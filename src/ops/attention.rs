//! Causal self-attention with an optional rotary embedding, and the KV cache of incremental
//! decoding.

use candle_core::{DType, Device, Result, Tensor, D};

use super::dropout::{Dropout, Site};
use super::use_fused;
pub use crate::cpu::fused::RotaryPairs;
use crate::cpu::fused::{self, CausalSelfAttention};

/// sin/cos tables for the rotary embedding, `[n_positions, rotary_dim / 2]`, fp32.
#[derive(Debug, Clone)]
pub struct Rotary {
    sin: Tensor,
    cos: Tensor,
    /// Leading dims of each head that rotate; the rest pass through.
    dim: usize,
    pairs: RotaryPairs,
}

impl Rotary {
    /// Tables for `rotary_dim` rotated dims of each head over `n_positions` positions, with
    /// frequencies `base^(-2i / rotary_dim)` (HF's `rotary_emb_base`, 10000 for GPT-J), turning
    /// the dims `pairs` says together.
    pub fn new(
        rotary_dim: usize,
        n_positions: usize,
        base: f32,
        pairs: RotaryPairs,
        device: &Device,
    ) -> Result<Self> {
        let dim = rotary_dim;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let half = inv_freq.len();
        let mut angles = Vec::with_capacity(n_positions * half);
        for pos in 0..n_positions {
            angles.extend(inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (n_positions, half), device)?;
        Ok(Self {
            sin: angles.sin()?,
            cos: angles.cos()?,
            dim,
            pairs,
        })
    }

    /// `xs` (`[batch, seq, heads, head_dim]`, fp32) with its first `dim` dims of each head
    /// rotated and the rest passed through.
    fn rotate(&self, xs: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
        let head_dim = xs.dim(3)?;
        if self.dim == head_dim {
            return self.apply(xs, position_ids);
        }
        let rot = xs.narrow(3, 0, self.dim)?;
        let pass = xs.narrow(3, self.dim, head_dim - self.dim)?;
        Tensor::cat(&[self.apply(&rot, position_ids)?, pass], 3)
    }

    /// Rotates `xs` (`[batch, seq, heads, rotary_dim]`, fp32): each pair `(first, second)`
    /// becomes `(first cos - second sin, second cos + first sin)`.
    fn apply(&self, xs: &Tensor, position_ids: &Tensor) -> Result<Tensor> {
        let (b, t, h, r) = xs.dims4()?;
        let flat_positions = position_ids.flatten_all()?;
        let sin = self
            .sin
            .index_select(&flat_positions, 0)?
            .reshape((b, t, 1, r / 2))?;
        let cos = self
            .cos
            .index_select(&flat_positions, 0)?
            .reshape((b, t, 1, r / 2))?;
        let (first, second) = match self.pairs {
            RotaryPairs::Interleaved => {
                let pairs = xs.reshape((b, t, h, r / 2, 2))?;
                (
                    pairs.narrow(4, 0, 1)?.squeeze(4)?,
                    pairs.narrow(4, 1, 1)?.squeeze(4)?,
                )
            }
            RotaryPairs::Halves => (xs.narrow(3, 0, r / 2)?, xs.narrow(3, r / 2, r / 2)?),
        };
        let rotated_first = (first.broadcast_mul(&cos)? - second.broadcast_mul(&sin)?)?;
        let rotated_second = (second.broadcast_mul(&cos)? + first.broadcast_mul(&sin)?)?;
        match self.pairs {
            RotaryPairs::Interleaved => {
                Tensor::stack(&[rotated_first, rotated_second], 4)?.reshape((b, t, h, r))
            }
            RotaryPairs::Halves => Tensor::cat(&[rotated_first, rotated_second], 3),
        }
    }
}

/// Keys (after rotary, fp32) and values (compute dtype) of earlier positions, one entry a layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Positions to allocate room for at the first append.
    capacity: usize,
}

/// One layer's keys and values, `[batch, heads, room, head_dim]`, of which the first `len`
/// positions are filled. Appending writes in place; the buffers are only reallocated (doubled)
/// when full, so a decode step does not copy the whole cache as concatenation would.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerCache {
    /// Appends `k` and `v` (`[batch, heads, t, head_dim]`) and returns views of everything cached.
    pub(super) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        capacity: usize,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let room = self
            .buffers
            .as_ref()
            .map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if needed > room {
            let grown = needed.max(capacity).max(room * 2);
            let (b, h, _, d) = k.dims4()?;
            let kb = Tensor::zeros((b, h, grown, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, grown, d), v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = &self.buffers {
                kb.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.buffers = Some((kb, vb));
        }
        let (kb, vb) = self.buffers.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self::with_capacity(n_layer, 0)
    }

    /// A cache that allocates room for `positions` at once (prompt plus new tokens).
    pub fn with_capacity(n_layer: usize, positions: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layer],
            capacity: positions,
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `i`'s cache and the room to allocate at its first append, for
    /// [`causal_attention`].
    pub fn layer(&mut self, i: usize) -> (&mut LayerCache, usize) {
        (&mut self.layers[i], self.capacity)
    }

    /// Keeps only the given batch rows (used when finished rows leave a batched generation).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for layer in self.layers.iter_mut() {
            if let Some((k, v)) = &mut layer.buffers {
                *k = k.index_select(rows, 0)?;
                *v = v.index_select(rows, 0)?;
            }
        }
        Ok(())
    }

    /// Drops the first `positions` cached positions of every row: padding that no remaining row
    /// attends to, once the rows it was aligning have left. Keeps the cache as long as its
    /// longest row instead of growing for as long as a server keeps a batch going.
    pub fn drop_front(&mut self, positions: usize) -> Result<()> {
        if positions == 0 {
            return Ok(());
        }
        for layer in self.layers.iter_mut() {
            assert!(positions <= layer.len, "dropping more than is cached");
            if let Some((k, v)) = &layer.buffers {
                let kept = layer.len - positions;
                let k = k.narrow(2, positions, kept)?;
                let v = v.narrow(2, positions, kept)?;
                *layer = LayerCache::filled(&k, &v, self.capacity)?;
            }
        }
        Ok(())
    }

    /// The rows of `self` then the rows of `other` in one cache. The shorter cache is
    /// left-padded with zeros to the longer's length; the caller masks those positions out
    /// (every row keeps its real positions contiguous and last, as left padding does).
    pub fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        assert_eq!(self.layers.len(), other.layers.len(), "caches of one model");
        let len = self.len().max(other.len());
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let (Some((k1, v1)), Some((k2, v2))) = (&mine.buffers, &theirs.buffers) else {
                panic!("appending rows to or from a cache that holds nothing");
            };
            let left_pad = |t: &Tensor, filled: usize| -> Result<Tensor> {
                let t = t.narrow(2, 0, filled)?;
                if filled == len {
                    return Ok(t);
                }
                let (b, h, _, d) = t.dims4()?;
                let zeros = Tensor::zeros((b, h, len - filled, d), t.dtype(), t.device())?;
                Tensor::cat(&[&zeros, &t], 2)
            };
            let k = Tensor::cat(&[left_pad(k1, mine.len)?, left_pad(k2, theirs.len)?], 0)?;
            let v = Tensor::cat(&[left_pad(v1, mine.len)?, left_pad(v2, theirs.len)?], 0)?;
            *mine = LayerCache::filled(&k, &v, self.capacity.max(other.capacity))?;
        }
        Ok(())
    }
}

impl LayerCache {
    /// A layer cache holding `k` and `v` (`[batch, heads, len, head_dim]`), with room for at
    /// least `capacity` positions so the next appends write in place.
    fn filled(k: &Tensor, v: &Tensor, capacity: usize) -> Result<Self> {
        let (b, h, len, d) = k.dims4()?;
        let room = capacity.max(len + 1);
        let kb = Tensor::zeros((b, h, room, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, h, room, d), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 2, 0)?;
        vb.slice_set(&v.contiguous()?, 2, 0)?;
        Ok(Self {
            buffers: Some((kb, vb)),
            len,
        })
    }
}

/// A row that is more than one causal sequence: the examples packed into it (`segment`, one
/// entry a position; positions only see their own example) and the prompt tokens of each
/// example (`prefix`), which see each other both ways, as in a prefix LM (UL2, GPT-JT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixLayout {
    pub segment: Vec<u32>,
    pub prefix: Vec<bool>,
}

/// Which keys each query may see: its own and earlier positions, less any padding.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// `[batch, 1, seq, cached + seq]`, fp32: 0 where a query may look, the most negative float
    /// where it may not.
    additive: Tensor,
    /// Whether this is the causal mask and nothing more (no padding, no window).
    plain_causal: bool,
}

impl AttentionMask {
    /// The causal mask of `seq` new positions after `cached` ones, less the keys `key_mask`
    /// (`[batch][cached + seq]`, 1 for real tokens) marks as padding and, with a `window`, the
    /// keys `window` or more positions back (GPT-Neo's local layers). With a `layout` (per row,
    /// over the `cached + seq` positions), a position sees only its own example's, and prompt
    /// positions see the whole prompt.
    pub fn causal(
        batch: usize,
        seq: usize,
        cached: usize,
        key_mask: Option<&[Vec<u8>]>,
        layout: Option<&[PrefixLayout]>,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let keys = cached + seq;
        let mut additive = vec![0f32; batch * seq * keys];
        for row in 0..batch {
            let real = key_mask.map(|m| &m[row]);
            let layout = layout.map(|l| &l[row]);
            for i in 0..seq {
                let query = cached + i;
                for j in 0..keys {
                    let ordered = match layout {
                        None => j <= query,
                        Some(l) => {
                            l.segment[j] == l.segment[query]
                                && (j <= query || (l.prefix[query] && l.prefix[j]))
                        }
                    };
                    let visible = ordered
                        && window.is_none_or(|w| query.abs_diff(j) < w)
                        && real.is_none_or(|r| r[j] == 1);
                    if !visible {
                        additive[(row * seq + i) * keys + j] = f32::MIN;
                    }
                }
            }
        }
        Ok(Self {
            additive: Tensor::from_vec(additive, (batch, 1, seq, keys), device)?,
            plain_causal: !key_mask.is_some_and(|m| m.iter().flatten().any(|&k| k == 0))
                && window.is_none_or(|w| w >= keys)
                && layout.is_none_or(|rows| {
                    rows.iter().all(|l| {
                        !l.prefix.iter().any(|&p| p) && l.segment.iter().all(|&s| s == l.segment[0])
                    })
                }),
        })
    }

    /// Whether this is the causal mask and nothing more, which a purely causal kernel applies.
    pub fn is_plain_causal(&self) -> bool {
        self.plain_causal
    }
}

/// How a model's attention turns and scales its scores.
#[derive(Debug, Clone, Copy)]
pub struct AttentionKind<'a> {
    /// The rotary embedding applied to q and k, if the model has one.
    pub rotary: Option<&'a Rotary>,
    /// What `q·kᵀ` is divided by: `sqrt(head_dim)` for most models, 1 for GPT-Neo.
    pub score_divisor: f64,
    /// Dropout on the attention probabilities in training, and this layer's index.
    pub dropout: Option<(&'a Dropout, usize)>,
}

/// Attention of `q`, `k`, `v` (`[batch, seq, heads, head_dim]`, as projected) with `kind`'s
/// rotary embedding applied to `q` and `k` at `position_ids`, `mask`, and the keys and values of
/// earlier positions from `cache` (this step's are appended). Scores, their softmax and the
/// rotation run in fp32 whatever the compute dtype, as HF's GPT-J does; returns
/// `[batch, seq, heads, head_dim]` in `v`'s dtype.
///
/// With the `flash-attn` feature, fp16/bf16 attention on a GPU that no gradient flows through
/// (generation, evaluation, scoring) and that masks no padding runs candle-flash-attn's kernel
/// instead: fp16/bf16 scores with fp32 accumulation. The kernel has no backward, so training
/// keeps this generic attention.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kind: AttentionKind,
    position_ids: &Tensor,
    mask: &AttentionMask,
    cache: Option<(&mut LayerCache, usize)>,
) -> Result<Tensor> {
    let dropout = kind
        .dropout
        .filter(|(d, layer)| d.rate(Site::Attention(*layer)) > 0.0);
    if cache.is_none() && use_fused(q) {
        let positions = position_ids.flatten_all()?;
        let table = |t: &Tensor| t.index_select(&positions, 0)?.flatten_all()?.to_vec1();
        let heads = q.dim(2)?;
        let dropout = dropout.map(|(d, layer)| {
            let rate = d.rate(Site::Attention(layer));
            (rate, d.attention_seeds(layer, heads))
        });
        // Without rotary, empty tables and no rotated dims.
        let (sin, cos, rotary_dim, pairs) = match kind.rotary {
            Some(rotary) => (
                table(&rotary.sin)?,
                table(&rotary.cos)?,
                rotary.dim,
                rotary.pairs,
            ),
            None => (Vec::new(), Vec::new(), 0, RotaryPairs::Interleaved),
        };
        let op = CausalSelfAttention {
            sin,
            cos,
            mask: mask.additive.flatten_all()?.to_vec1()?,
            rotary_dim,
            pairs,
            score_divisor: kind.score_divisor as f32,
            dropout,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let dtype = v.dtype();
    let prepare = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = match kind.rotary {
            Some(rotary) => rotary.rotate(&x, position_ids)?,
            None => x,
        };
        x.transpose(1, 2)
    };
    let (q, k) = (prepare(q)?, prepare(k)?);
    let v = v.transpose(1, 2)?;
    let (k, v) = match cache {
        Some((slot, capacity)) => slot.append(&k, &v, capacity)?,
        None => (k.contiguous()?, v.contiguous()?),
    };
    #[cfg(feature = "flash-attn")]
    if flash::applies(&q, &v, mask.is_plain_causal()) {
        return flash::attention(&q, &k, &v, kind.score_divisor);
    }
    let scores = (q.contiguous()?.matmul(&k.t()?)? / kind.score_divisor)?;
    let mut probs = softmax_last_dim(&scores.broadcast_add(&mask.additive)?)?.to_dtype(dtype)?;
    if let Some((dropout, layer)) = dropout {
        probs = dropout.apply(&probs, Site::Attention(layer))?;
    }
    probs.matmul(&v)?.transpose(1, 2)
}

/// What to tell a user training on `device` about the attention kernel, where it is not the one
/// they would expect: with the `flash-attn` feature on a GPU, flash attention serves inference
/// only, as its kernel has no backward.
pub fn training_attention_note(device: &Device) -> Option<&'static str> {
    (cfg!(feature = "flash-attn") && device.is_cuda()).then_some(
        "flash-attn has no backward pass: training uses the generic attention; evaluation, \
         generation and scoring in fp16/bf16 use flash attention",
    )
}

/// Softmax over the last dim with a backward pass (candle's fused kernel has none). Fused on the
/// CPU: one op forward and one backward, instead of five graph nodes whose backward each
/// allocate score-sized buffers; elsewhere built from differentiable primitives.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if use_fused(xs) {
        return xs.contiguous()?.apply_op1(fused::SoftmaxLastDim);
    }
    let max = xs.max_keepdim(D::Minus1)?;
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

#[cfg(feature = "flash-attn")]
mod flash {
    use candle_core::{DType, Result, Tensor};

    /// Whether flash attention may stand in for the generic code: fp16/bf16 on a GPU, a plain
    /// causal mask (the kernel masks nothing else), and no gradient to carry.
    pub(super) fn applies(q: &Tensor, v: &Tensor, plain_causal: bool) -> bool {
        q.device().is_cuda()
            && matches!(v.dtype(), DType::F16 | DType::BF16)
            && plain_causal
            && !q.track_op()
            && !v.track_op()
    }

    /// `softmax(q kᵀ / divisor) v` over causal positions for `q` (`[batch, heads, seq, head_dim]`,
    /// rotated, fp32) and `k`, `v` (`[batch, heads, cached + seq, head_dim]`); the kernel aligns
    /// the causal mask to the last key, so query `i` sees keys up to `cached + i`, as the generic
    /// mask does. Returns `[batch, seq, heads, head_dim]` in `v`'s dtype.
    pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, divisor: f64) -> Result<Tensor> {
        let dtype = v.dtype();
        let seq_major = |x: &Tensor| x.to_dtype(dtype)?.transpose(1, 2)?.contiguous();
        let scale = (1.0 / divisor) as f32;
        candle_flash_attn::flash_attn(&seq_major(q)?, &seq_major(k)?, &seq_major(v)?, scale, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_later_positions_and_padding_after_the_cache() {
        let key_mask = vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]];
        let mask =
            AttentionMask::causal(2, 2, 2, Some(&key_mask), None, None, &Device::Cpu).unwrap();
        assert!(!mask.is_plain_causal());
        let visible: Vec<Vec<Vec<bool>>> = mask
            .additive
            .squeeze(1)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|q| q.into_iter().map(|v| v == 0.0).collect())
                    .collect()
            })
            .collect();
        let t = true;
        let f = false;
        assert_eq!(visible[0], vec![vec![t, t, t, f], vec![t, t, t, t]]);
        assert_eq!(visible[1], vec![vec![t, t, t, f], vec![t, t, t, f]]);

        let unpadded = vec![vec![1, 1]; 2];
        let plain =
            AttentionMask::causal(2, 2, 0, Some(&unpadded), None, None, &Device::Cpu).unwrap();
        assert!(plain.is_plain_causal());
        let local = AttentionMask::causal(1, 4, 0, None, None, Some(2), &Device::Cpu).unwrap();
        assert!(!local.is_plain_causal());
        let local: Vec<Vec<f32>> = local
            .additive
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let seen: Vec<Vec<bool>> = local
            .iter()
            .map(|q| q.iter().map(|&v| v == 0.0).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![t, f, f, f],
                vec![t, t, f, f],
                vec![f, t, t, f],
                vec![f, f, t, t]
            ]
        );

        // Two packed examples: prompt [0, 1] + target [2], prompt [3] + target [4].
        let layout = PrefixLayout {
            segment: vec![0, 0, 0, 1, 1],
            prefix: vec![true, true, false, true, false],
        };
        let prefix =
            AttentionMask::causal(1, 5, 0, None, Some(&[layout]), None, &Device::Cpu).unwrap();
        assert!(!prefix.is_plain_causal());
        let rows: Vec<Vec<f32>> = prefix
            .additive
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let seen: Vec<Vec<bool>> = rows
            .iter()
            .map(|q| q.iter().map(|&v| v == 0.0).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![t, t, f, f, f],
                vec![t, t, f, f, f],
                vec![t, t, t, f, f],
                vec![f, f, f, t, f],
                vec![f, f, f, t, t]
            ]
        );
    }
}
