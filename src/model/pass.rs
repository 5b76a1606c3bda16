//! How a family's forward runs its stages: straight through, appending to a KV cache,
//! checkpointed (each block's input kept, the graph cut between blocks), or recomputing one
//! block from its kept input. The family writes its forward once (embed → blocks → final norm,
//! each stage handed to the pass); activation checkpointing and decoding reuse it as it is.

use candle_core::{Device, Result, Tensor, Var};

use super::block::Masks;
use super::Batch;
use crate::ops::{KvCache, LayerCache};

pub struct Pass<'c> {
    mode: Mode<'c>,
    /// The index of the next block.
    layer: usize,
    masks: Option<Masks>,
}

enum Mode<'c> {
    Plain,
    Cached(&'c mut KvCache),
    Checkpointed(Checkpointed),
    Recompute(Recompute),
}

/// What a checkpointed forward keeps for the backward.
#[derive(Default)]
pub struct Checkpointed {
    /// The embeddings, with their graph (what the gradient reaching the first block flows into).
    pub embedded: Option<Tensor>,
    /// Each block's input, detached.
    pub inputs: Vec<Tensor>,
    /// The last block's output as a variable: the final norm and the head start from it.
    pub last: Option<Var>,
}

struct Recompute {
    layer: usize,
    input: Var,
    output: Option<Tensor>,
}

impl<'c> Pass<'c> {
    pub fn plain() -> Self {
        Self::new(Mode::Plain)
    }

    /// Decoding: each block reads and extends its layer of `cache`.
    pub fn cached(cache: &'c mut KvCache) -> Self {
        Self::new(Mode::Cached(cache))
    }

    /// Keeps each block's input and cuts the graph between blocks (see
    /// [`Self::into_checkpointed`]).
    pub fn checkpointed() -> Self {
        Self::new(Mode::Checkpointed(Checkpointed::default()))
    }

    /// Runs block `layer` alone, from `input`, with its graph (see [`Self::into_output`]); the
    /// other stages are not computed.
    pub fn recompute(layer: usize, input: Var) -> Self {
        Self::new(Mode::Recompute(Recompute {
            layer,
            input,
            output: None,
        }))
    }

    fn new(mode: Mode<'c>) -> Self {
        Self {
            mode,
            layer: 0,
            masks: None,
        }
    }

    /// The attention masks of `batch` after the positions already cached, built once per pass;
    /// `window` adds the local layers' mask.
    pub fn masks(
        &mut self,
        batch: &Batch,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Masks> {
        if let Some(masks) = &self.masks {
            return Ok(masks.clone());
        }
        let cached = match &self.mode {
            Mode::Cached(cache) => cache.len(),
            _ => 0,
        };
        let masks = Masks {
            global: batch.attention_mask(cached, None, device)?,
            local: window
                .map(|w| batch.attention_mask(cached, Some(w), device))
                .transpose()?,
        };
        self.masks = Some(masks.clone());
        Ok(masks)
    }

    /// The embedding stage.
    pub fn embed(&mut self, embed: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        match &mut self.mode {
            Mode::Plain | Mode::Cached(_) => embed(),
            Mode::Checkpointed(kept) => {
                let embedded = embed()?;
                let cut = embedded.detach();
                kept.embedded = Some(embedded);
                Ok(cut)
            }
            // A stand-in the skipped blocks pass along untouched.
            Mode::Recompute(one) => Ok(one.input.as_tensor().clone()),
        }
    }

    /// The next block, `block(xs, its cache slot)`.
    pub fn block(
        &mut self,
        xs: Tensor,
        block: impl FnOnce(&Tensor, Option<(&mut LayerCache, usize)>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let layer = self.layer;
        self.layer += 1;
        match &mut self.mode {
            Mode::Plain => block(&xs, None),
            Mode::Cached(cache) => block(&xs, Some(cache.layer(layer))),
            Mode::Checkpointed(kept) => {
                let out = block(&xs, None)?.detach();
                kept.inputs.push(xs);
                Ok(out)
            }
            Mode::Recompute(one) if one.layer == layer => {
                let out = block(one.input.as_tensor(), None)?;
                one.output = Some(out.clone());
                Ok(out)
            }
            Mode::Recompute(_) => Ok(xs),
        }
    }

    /// The final norm, from the last block's output.
    pub fn finish(
        &mut self,
        xs: Tensor,
        norm: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match &mut self.mode {
            Mode::Plain | Mode::Cached(_) => norm(&xs),
            Mode::Checkpointed(kept) => {
                let last = Var::from_tensor(&xs)?;
                let hidden = norm(last.as_tensor())?;
                kept.last = Some(last);
                Ok(hidden)
            }
            Mode::Recompute(_) => Ok(xs),
        }
    }

    /// What a checkpointed pass kept.
    pub fn into_checkpointed(self) -> Checkpointed {
        match self.mode {
            Mode::Checkpointed(kept) => kept,
            _ => Checkpointed::default(),
        }
    }

    /// The recomputed block's output, with its graph back to the input.
    pub fn into_output(self) -> Option<Tensor> {
        match self.mode {
            Mode::Recompute(one) => one.output,
            _ => None,
        }
    }
}
