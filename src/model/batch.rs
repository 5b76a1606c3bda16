//! What one forward pass reads: token ids, where each row's real tokens are, their positions,
//! the attention layout and the training-time dropout.

use candle_core::{Device, Tensor};

use crate::ops::{AttentionMask, Dropout, Linear, PrefixLayout, Site};

/// What one forward pass sees: token ids, where each row's real tokens are, and their positions.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` positions of these tokens (per row, so padded rows keep their own).
    pub position_ids: Tensor,
    /// 1 for real tokens, 0 for padding, over the cached positions plus this step's
    /// (`[batch, cached + seq]`); `None` when no row is padded.
    pub key_mask: Option<Vec<Vec<u8>>>,
    /// Packed examples and bidirectional prompts (prefix LM), per row over the cached positions
    /// plus this step's; `None` for plain causal attention.
    pub layout: Option<Vec<PrefixLayout>>,
    /// Training-time dropout; `None` (evaluation, generation) runs without.
    pub dropout: Option<Dropout>,
    /// Run the base model alone, every LoRA adapter off (a preference objective's reference:
    /// the same weights, no copy).
    pub adapters_off: bool,
}

impl Batch {
    /// Right-padded rows of token ids; positions count from 0 in every row.
    pub fn right_padded(
        rows: &[Vec<u32>],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut key_mask = Vec::with_capacity(rows.len());
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, seq - row.len()));
            let mut mask = vec![1u8; row.len()];
            mask.resize(seq, 0);
            key_mask.push(mask);
        }
        let padded = rows.iter().any(|r| r.len() != seq);
        let positions: Vec<u32> = (0..rows.len()).flat_map(|_| 0..seq as u32).collect();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows.len(), seq), device)?,
            position_ids: Tensor::from_vec(positions, (rows.len(), seq), device)?,
            key_mask: padded.then_some(key_mask),
            layout: None,
            dropout: None,
            adapters_off: false,
        })
    }

    /// Left-padded prompts for a prefill that later steps continue from a KV cache: every row's
    /// last token sits in the last column, so the tokens that follow line up across rows, and
    /// positions count from 0 at each row's first real token. The key mask is always present
    /// (later steps extend it). A model trained as a prefix LM reads each prompt both ways.
    pub fn left_padded(
        rows: &[Vec<u32>],
        pad_id: u32,
        prefix_lm: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * longest);
        let mut positions = Vec::with_capacity(rows.len() * longest);
        let mut key_mask = Vec::with_capacity(rows.len());
        for row in rows {
            let pad = longest - row.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(row);
            positions.extend(std::iter::repeat_n(0u32, pad));
            positions.extend(0..row.len() as u32);
            let mut mask = vec![0u8; pad];
            mask.resize(longest, 1);
            key_mask.push(mask);
        }
        let layout = prefix_lm.then(|| {
            key_mask
                .iter()
                .map(|mask| PrefixLayout {
                    segment: vec![0; mask.len()],
                    prefix: mask.iter().map(|&m| m == 1).collect(),
                })
                .collect()
        });
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows.len(), longest), device)?,
            position_ids: Tensor::from_vec(positions, (rows.len(), longest), device)?,
            key_mask: Some(key_mask),
            layout,
            dropout: None,
            adapters_off: false,
        })
    }

    /// Right-padded rows laid out as prefix-LM examples (`layouts[r]` covers row `r`'s tokens):
    /// positions restart at 0 with each example of a packed row, as each was its own sequence.
    pub fn prefix_lm(
        rows: &[Vec<u32>],
        layouts: &[PrefixLayout],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut batch = Self::right_padded(rows, pad_id, device)?;
        let (b, seq) = batch.dims()?;
        let mut positions = Vec::with_capacity(b * seq);
        let mut padded_layouts = Vec::with_capacity(b);
        for layout in layouts {
            let mut layout = layout.clone();
            let last = layout.segment.last().copied().unwrap_or(0);
            layout.segment.resize(seq, last);
            layout.prefix.resize(seq, false);
            let mut position = 0u32;
            for i in 0..seq {
                if i > 0 && layout.segment[i] != layout.segment[i - 1] {
                    position = 0;
                }
                positions.push(position);
                position += 1;
            }
            padded_layouts.push(layout);
        }
        batch.position_ids = Tensor::from_vec(positions, (b, seq), device)?;
        batch.layout = Some(padded_layouts);
        Ok(batch)
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.input_ids.dims2()
    }

    /// `xs` after this batch's dropout at `site` (unchanged without dropout).
    pub fn drop(&self, xs: Tensor, site: Site) -> candle_core::Result<Tensor> {
        match &self.dropout {
            Some(dropout) => dropout.apply(&xs, site),
            None => Ok(xs),
        }
    }

    /// `layer` applied to `xs`, its LoRA adapter's input under this batch's dropout.
    pub fn linear(&self, layer: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self.adapters_off {
            true => layer.forward_base(xs),
            false => layer.forward_dropped(xs, self.dropout.as_ref()),
        }
    }

    /// The dropout of the attention probabilities of `layer`, for [`AttentionKind`].
    pub fn attention_dropout(&self, layer: usize) -> Option<(&Dropout, usize)> {
        self.dropout.as_ref().map(|d| (d, layer))
    }

    /// The mask of this batch's `seq` positions after `cached` ones (see
    /// [`AttentionMask::causal`]); `window` limits how far back a position sees.
    pub fn attention_mask(
        &self,
        cached: usize,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<AttentionMask> {
        let (b, t) = self.dims()?;
        let key_mask = self.key_mask.as_deref();
        AttentionMask::causal(
            b,
            t,
            cached,
            key_mask,
            self.layout.as_deref(),
            window,
            device,
        )
    }
}
