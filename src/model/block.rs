//! The transformer block every family shares, with flags where they differ (as litgpt's
//! `Block`): pre-norm attention and MLP, summed into the residual one after the other
//! (GPT-2, GPT-Neo, NeoX without `use_parallel_residual`) or side by side (GPT-J, NeoX), from
//! one LayerNorm (GPT-J) or two.

use candle_core::{Module, Result, Tensor};

use super::Batch;
use crate::ops::{self, AttentionKind, AttentionMask, LayerCache, LayerNorm, Linear, Rotary, Site};

/// The MLP's activation between its two projections.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    /// GPT-2's tanh approximation (`gelu_new`): GPT-2, GPT-Neo, GPT-J.
    GeluNew,
    /// The exact erf GELU (`gelu`): GPT-NeoX / Pythia.
    Gelu,
}

/// Up-projection, activation, down-projection.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
}

impl Mlp {
    pub fn forward(&self, xs: &Tensor, batch: &Batch) -> Result<Tensor> {
        let up = batch.linear(&self.up, xs)?;
        let hidden = match self.activation {
            Activation::GeluNew => ops::gelu_new(&up)?,
            Activation::Gelu => ops::gelu(&up)?,
        };
        batch.linear(&self.down, &hidden)
    }
}

/// How a family projects the hidden states to queries, keys and values.
#[derive(Debug, Clone)]
pub enum Qkv {
    /// Three projections (GPT-J, GPT-Neo).
    Separate { q: Linear, k: Linear, v: Linear },
    /// One projection whose output is `[q | k | v]` (GPT-2's `c_attn`).
    Stacked(Linear),
    /// One projection whose output is `[q k v]` per head (GPT-NeoX's `query_key_value`).
    PerHead(Linear),
}

/// Which mask a layer's attention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Global,
    /// GPT-Neo's local layers: only the last `window_size` positions.
    Local,
}

/// The masks of one forward pass, built once for all its layers.
#[derive(Debug, Clone)]
pub struct Masks {
    pub global: AttentionMask,
    /// For [`Reach::Local`] layers (GPT-Neo).
    pub local: Option<AttentionMask>,
}

/// Multi-head causal self-attention: the family's projections, then attention over the cache
/// and this step, the output projection and its dropout.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub qkv: Qkv,
    pub out: Linear,
    pub n_head: usize,
    pub head_dim: usize,
    pub rotary: Option<Rotary>,
    /// What `q·kᵀ` is divided by.
    pub score_divisor: f64,
    pub reach: Reach,
    pub layer: usize,
}

impl SelfAttention {
    pub fn forward(
        &self,
        xs: &Tensor,
        batch: &Batch,
        masks: &Masks,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, e) = xs.dims3()?;
        let (n, d) = (self.n_head, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                let heads = |ys: Tensor| ys.reshape((b, t, n, d));
                let q = heads(batch.linear(q, xs)?)?;
                let k = heads(batch.linear(k, xs)?)?;
                (q, k, heads(batch.linear(v, xs)?)?)
            }
            Qkv::Stacked(qkv) => {
                let qkv = batch.linear(qkv, xs)?;
                let heads = |i: usize| qkv.narrow(2, i * e, e)?.reshape((b, t, n, d));
                (heads(0)?, heads(1)?, heads(2)?)
            }
            Qkv::PerHead(qkv) => {
                let qkv = batch.linear(qkv, xs)?.reshape((b, t, n, 3 * d))?;
                let part = |i: usize| qkv.narrow(3, i * d, d);
                (part(0)?, part(1)?, part(2)?)
            }
        };
        let kind = AttentionKind {
            rotary: self.rotary.as_ref(),
            score_divisor: self.score_divisor,
            dropout: batch.attention_dropout(self.layer),
        };
        let mask = match (self.reach, &masks.local) {
            (Reach::Local, Some(local)) => local,
            _ => &masks.global,
        };
        let out = ops::causal_attention(&q, &k, &v, kind, &batch.position_ids, mask, cache)?;
        let out = batch.linear(&self.out, &out.reshape((b, t, e))?)?;
        batch.drop(out, Site::AttentionOutput(self.layer))
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Before attention (and, without `norm_2`, before the MLP too).
    pub norm_1: LayerNorm,
    /// Before the MLP; `None` where the MLP reads `norm_1`'s output (GPT-J).
    pub norm_2: Option<LayerNorm>,
    pub attn: SelfAttention,
    pub mlp: Mlp,
    /// `x + attn(x) + mlp(x)` instead of `y = x + attn(x); y + mlp(y)`.
    pub parallel_residual: bool,
    pub layer: usize,
}

impl Block {
    pub fn forward(
        &self,
        xs: &Tensor,
        batch: &Batch,
        masks: &Masks,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let normed = self.norm_1.forward(xs)?;
        let attn = self.attn.forward(&normed, batch, masks, cache)?;
        let mlp = |ys: &Tensor| {
            let mlp_in = match &self.norm_2 {
                Some(norm) => norm.forward(ys)?,
                None => ys.clone(),
            };
            batch.drop(
                self.mlp.forward(&mlp_in, batch)?,
                Site::MlpOutput(self.layer),
            )
        };
        if self.parallel_residual {
            let mlp = match &self.norm_2 {
                Some(_) => mlp(xs)?,
                None => mlp(&normed)?,
            };
            (attn + mlp)? + xs
        } else {
            let xs = (attn + xs)?;
            mlp(&xs)? + xs
        }
    }
}
