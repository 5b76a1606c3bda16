//! Token rows from tokenized examples: packing (HF `run_clm`, Graphcore) or one example a row.

use anyhow::{bail, Result};

use super::Sequence;
use crate::recipe::Truncation;

/// HF `datasets.map(group_texts, batched=True)` groups 1000 examples at a time; the blocks
/// (and the dropped remainders) depend on it, so it is part of the format.
pub const PACK_GROUP: usize = 1000;

/// Concatenates examples in groups of [`PACK_GROUP`], cuts each group into `seq_len` blocks and
/// drops each group's remainder. Returns the blocks and the number of tokens dropped. Prefix-LM
/// examples keep their layout, each numbered as its own segment of the block it lands in.
pub fn pack(examples: &[Sequence], seq_len: usize) -> (Vec<Sequence>, usize) {
    let mut blocks = Vec::new();
    let mut dropped = 0;
    for group in examples.chunks(PACK_GROUP) {
        let total: usize = group.iter().map(Sequence::len).sum();
        let mut joined = Sequence::new(Vec::with_capacity(total), Vec::with_capacity(total));
        for (index, example) in group.iter().enumerate() {
            joined.ids.extend_from_slice(&example.ids);
            joined.loss_mask.extend_from_slice(&example.loss_mask);
            if example.is_prefix_lm() {
                joined
                    .segment
                    .extend(std::iter::repeat_n(index as u32, example.len()));
                joined.prefix.extend_from_slice(&example.prefix);
            }
        }
        let kept = total / seq_len * seq_len;
        dropped += total - kept;
        for start in (0..kept).step_by(seq_len) {
            blocks.push(joined.slice(start..start + seq_len));
        }
    }
    (blocks, dropped)
}

/// One example a row, unpadded (the trainer right-pads each micro-batch). Examples longer than
/// `seq_len` are cut as `truncation` says (`Left` keeps the end, where the target is), or are an
/// error naming the example. Returns the rows and how many were truncated.
pub fn one_per_row(
    examples: Vec<Sequence>,
    seq_len: usize,
    truncation: Truncation,
    origin_of: impl Fn(usize) -> String,
) -> Result<(Vec<Sequence>, usize)> {
    let mut truncated = 0;
    let mut rows = Vec::with_capacity(examples.len());
    for (i, mut example) in examples.into_iter().enumerate() {
        let len = example.len();
        if len > seq_len {
            match truncation {
                Truncation::Error => bail!(
                    "{}: the example has {len} tokens, more than data.seq_len = {seq_len} \
                     (raise seq_len, or set data.truncation to left or right)",
                    origin_of(i)
                ),
                Truncation::Right => example = example.slice(0..seq_len),
                Truncation::Left => example = example.slice(len - seq_len..len),
            }
            truncated += 1;
        }
        rows.push(example);
    }
    Ok((rows, truncated))
}
