//! Dropout in training, replayable: which elements a site zeroes is a pure function of the row's
//! key (from the run's seed, the step and the row's place in the global batch) and the site, so
//! a resumed run draws exactly the masks the uninterrupted one would have, however the batch is
//! cut into micro-batches, replicas and workers.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::cpu::fused::{dropout_factors, splitmix64};

/// Dropout probabilities, as HF's configs name them: after the embeddings (`embd_pdrop`), on
/// the residual branches (`resid_pdrop`: attention output and MLP output) and on the attention
/// probabilities (`attn_pdrop`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropoutRates {
    #[serde(default)]
    pub resid: f64,
    #[serde(default)]
    pub embd: f64,
    #[serde(default)]
    pub attn: f64,
    /// On the input of LoRA adapters (`lora.dropout`).
    #[serde(default)]
    pub lora: f64,
}

impl DropoutRates {
    pub fn is_off(&self) -> bool {
        self.resid == 0.0 && self.embd == 0.0 && self.attn == 0.0 && self.lora == 0.0
    }
}

/// Where in the model a mask is drawn; with the row key it names the mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    Embeddings,
    /// Attention probabilities of a layer.
    Attention(usize),
    /// The attention output of a layer, before it joins the residual stream.
    AttentionOutput(usize),
    /// The MLP output of a layer.
    MlpOutput(usize),
    /// The input of a LoRA adapter, by a hash of the adapted layer's HF path.
    LoraInput(u64),
}

impl Site {
    fn code(self) -> u64 {
        let (kind, layer) = match self {
            // The top bit keeps these apart from the layer sites' small codes.
            Site::LoraInput(path_hash) => return path_hash | 1 << 63,
            Site::Embeddings => (0, 0),
            Site::Attention(l) => (1, l),
            Site::AttentionOutput(l) => (2, l),
            Site::MlpOutput(l) => (3, l),
        };
        (layer as u64) << 2 | kind
    }
}

/// A training forward pass's dropout: the rates and one key per batch row.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropout {
    pub rates: DropoutRates,
    pub row_keys: Vec<u64>,
}

impl Dropout {
    /// Keys for rows `first_row..first_row + rows` of the global batch of `step` in a run seeded
    /// with `seed`.
    pub fn for_rows(
        rates: DropoutRates,
        seed: u64,
        step: u64,
        first_row: usize,
        rows: usize,
    ) -> Self {
        let row_keys = (first_row..first_row + rows)
            .map(|row| mix(mix(mix(0x6b69_6c6e, seed), step), row as u64))
            .collect();
        Self { rates, row_keys }
    }

    /// The rate that applies at `site`.
    pub fn rate(&self, site: Site) -> f64 {
        match site {
            Site::Embeddings => self.rates.embd,
            Site::Attention(_) => self.rates.attn,
            Site::AttentionOutput(_) | Site::MlpOutput(_) => self.rates.resid,
            Site::LoraInput(_) => self.rates.lora,
        }
    }

    /// `xs` (`[batch, ...]`, one row a key) with each element zeroed with the site's rate and the
    /// rest scaled by `1 / (1 - rate)`, as `torch.nn.Dropout` in training.
    pub fn apply(&self, xs: &Tensor, site: Site) -> Result<Tensor> {
        let p = self.rate(site);
        if p == 0.0 {
            return Ok(xs.clone());
        }
        let rows = xs.dim(0)?;
        if rows != self.row_keys.len() {
            candle_core::bail!("dropout: {rows} rows but {} row keys", self.row_keys.len());
        }
        // Attention probabilities `[batch, heads, queries, keys]` draw per (row, head), as the
        // fused attention kernel does, so both give the same masks.
        let seeds = match site {
            Site::Attention(layer) => self.attention_seeds(layer, xs.dim(1)?),
            _ => self
                .row_keys
                .iter()
                .map(|&key| mix(key, site.code()))
                .collect(),
        };
        let per_seed = xs.elem_count() / seeds.len().max(1);
        let mut mask = Vec::with_capacity(xs.elem_count());
        for seed in seeds {
            mask.extend(dropout_factors(seed, p, per_seed));
        }
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        xs * mask
    }

    /// One seed per (row, head) for the attention probabilities of `layer`, `[rows × heads]`.
    pub(super) fn attention_seeds(&self, layer: usize, heads: usize) -> Vec<u64> {
        let site = Site::Attention(layer).code();
        self.row_keys
            .iter()
            .flat_map(|&key| (0..heads as u64).map(move |head| mix(mix(key, site), head)))
            .collect()
    }
}

/// A 64-bit mix (splitmix64's finaliser) of `a` and `b`: nearby inputs give unrelated keys.
fn mix(a: u64, b: u64) -> u64 {
    splitmix64(
        a ^ b
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(a << 6)
            .wrapping_add(a >> 2),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rates(p: f64) -> DropoutRates {
        DropoutRates {
            resid: p,
            embd: p,
            attn: p,
            lora: p,
        }
    }

    #[test]
    fn masks_are_a_function_of_seed_step_row_and_site() {
        let xs = Tensor::ones((2, 64, 32), DType::F32, &Device::Cpu).unwrap();
        let draw = |seed, step, first_row, site| {
            Dropout::for_rows(rates(0.3), seed, step, first_row, 2)
                .apply(&xs, site)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let site = Site::MlpOutput(1);
        assert_eq!(draw(7, 3, 0, site), draw(7, 3, 0, site), "replayable");
        assert_ne!(
            draw(7, 3, 0, site),
            draw(7, 4, 0, site),
            "a new mask each step"
        );
        assert_ne!(draw(7, 3, 0, site), draw(8, 3, 0, site), "seeded");
        assert_ne!(
            draw(7, 3, 0, site),
            draw(7, 3, 0, Site::MlpOutput(0)),
            "per layer"
        );
        assert_ne!(
            draw(7, 3, 0, site),
            draw(7, 3, 0, Site::AttentionOutput(1)),
            "per site"
        );
        // A row's mask depends on its place in the global batch, not on the shard it is in.
        let both = draw(7, 3, 0, site);
        let second_alone = Dropout::for_rows(rates(0.3), 7, 3, 1, 1)
            .apply(&xs.narrow(0, 1, 1).unwrap(), site)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(both[64 * 32..], second_alone[..]);
    }

    #[test]
    fn dropout_keeps_the_expected_value_and_zeroes_the_rate() {
        let n = 200_000;
        let xs = Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap();
        let p = 0.1;
        let out = Dropout::for_rows(rates(p), 0, 1, 0, 1)
            .apply(&xs, Site::Embeddings)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let zeroed = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        let mean = out.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        // Binomial: the zeroed fraction's standard deviation is sqrt(p(1-p)/n) ≈ 6.7e-4, the
        // mean's about 7.5e-4; 5 sigma.
        assert!((zeroed - p).abs() < 5.0 * 6.7e-4, "zeroed {zeroed}");
        assert!((mean - 1.0).abs() < 5.0 * 7.5e-4, "mean {mean}");
        let off = Dropout::for_rows(rates(0.0), 0, 1, 0, 1)
            .apply(&xs, Site::Embeddings)
            .unwrap();
        assert_eq!(off.sum_all().unwrap().to_scalar::<f32>().unwrap(), n as f32);
    }
}
