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

/// Whole examples fitted into rows of at most `seq_len` tokens, best-fit decreasing (longest
/// first, each into the row it leaves least room in; TRL's `bfd`), each example its own segment
/// of the row: it attends only to itself, its positions restart at 0, and its first token is not
/// trained as the continuation of the example before it — the same loss and gradients as alone.
/// Longer examples are cut as `truncation` says first. Returns the rows, in the order they were
/// opened, and how many examples were truncated.
pub fn pack_isolated(
    examples: Vec<Sequence>,
    seq_len: usize,
    truncation: Truncation,
    origin_of: impl Fn(usize) -> String,
) -> Result<(Vec<Sequence>, usize)> {
    use std::collections::{BTreeMap, BTreeSet};
    let (examples, truncated) = one_per_row(examples, seq_len, truncation, origin_of)?;
    let mut order: Vec<usize> = (0..examples.len())
        .filter(|&i| !examples[i].is_empty())
        .collect();
    // Stable: equal lengths keep their data order.
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Room left → the rows with that much room (full rows are not tracked), oldest first.
    let mut room: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for i in order {
        let len = examples[i].len();
        let fit = room.range(len..).next().map(|(&left, rows)| {
            let row = *rows.first().expect("no empty sets are kept");
            (left, row)
        });
        let (row, left) = match fit {
            Some((left, row)) => {
                let rows = room.get_mut(&left).expect("found above");
                rows.remove(&row);
                if rows.is_empty() {
                    room.remove(&left);
                }
                (row, left - len)
            }
            None => {
                rows.push(Vec::new());
                (rows.len() - 1, seq_len - len)
            }
        };
        rows[row].push(i);
        if left > 0 {
            room.entry(left).or_default().insert(row);
        }
    }
    let packed = rows
        .into_iter()
        .map(|members| {
            let total = members.iter().map(|&i| examples[i].len()).sum();
            let mut row = Sequence::new(Vec::with_capacity(total), Vec::with_capacity(total));
            for (segment, &i) in members.iter().enumerate() {
                let example = &examples[i];
                row.ids.extend_from_slice(&example.ids);
                let start = row.loss_mask.len();
                row.loss_mask.extend_from_slice(&example.loss_mask);
                row.loss_mask[start] = false;
                row.segment
                    .extend(std::iter::repeat_n(segment as u32, example.len()));
                match example.is_prefix_lm() {
                    true => row.prefix.extend_from_slice(&example.prefix),
                    false => row.prefix.extend(std::iter::repeat_n(false, example.len())),
                }
            }
            row
        })
        .collect();
    Ok((packed, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_packing_fits_whole_examples_best_fit_decreasing() {
        let lens = [5, 3, 6, 2, 4, 1];
        let examples: Vec<Sequence> = (lens.iter().enumerate())
            .map(|(i, &n)| Sequence::all_trained(vec![i as u32; n]))
            .collect();
        let (rows, truncated) =
            pack_isolated(examples, 8, Truncation::Error, |i| format!("row {i}")).unwrap();
        assert_eq!(truncated, 0);
        // 6 → row 0 (2 left); 5 → row 1 (3 left); 4 → row 2 (4 left); 3 → row 1 (0 left);
        // 2 → row 0 (0 left); 1 → row 2 (3 left).
        let members: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut ids = r.ids.clone();
                ids.dedup();
                ids
            })
            .collect();
        assert_eq!(members, [vec![2, 3], vec![0, 1], vec![4, 5]]);
        for row in &rows {
            assert!(row.len() <= 8);
            for (i, &s) in row.segment.iter().enumerate() {
                let starts = i == 0 || row.segment[i - 1] != s;
                assert_eq!(
                    row.loss_mask[i], !starts,
                    "only each example's first token is untrained"
                );
                assert!(!row.prefix[i]);
            }
        }
    }
}
