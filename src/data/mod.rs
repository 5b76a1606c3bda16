//! From datasets to token batches: sources → text-to-text templates → tokenize → pack or pad.

pub mod chat;
pub mod check;
pub mod fast_bpe;
pub mod fingerprint;
pub mod pack;
pub mod preference;
pub mod prepare;
pub mod preview;
pub mod source;
pub mod stream;
pub mod template;

pub use check::{check, Derived, Resolved};
pub use fingerprint::{FileDigest, SourceFingerprint};
pub use preference::{prepare_pairs, PreferencePair};
pub use prepare::{
    load_split_records, prepare, render_datasets, render_split, tokenize_all, tokenize_example,
    tokenize_examples, DataStats, LoadedDataset, Prepared, Split,
};
pub use source::{load_records, Records};
pub use stream::{SequenceStream, Stream, StreamState};
pub use template::Rendered;

/// One training row as the model sees it: token ids and, per token, whether predicting that
/// token counts towards the loss (`loss_on: target` clears it for prompt tokens and padding).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// With `data.attention: prefix`, per token: the example of the packed row it belongs to
    /// and whether it is in that example's prompt. Empty for causal attention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segment: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix: Vec<bool>,
}

impl Sequence {
    pub fn all_trained(ids: Vec<u32>) -> Self {
        let loss_mask = vec![true; ids.len()];
        Self::new(ids, loss_mask)
    }

    /// A causal row.
    pub fn new(ids: Vec<u32>, loss_mask: Vec<bool>) -> Self {
        Self {
            ids,
            loss_mask,
            segment: Vec::new(),
            prefix: Vec::new(),
        }
    }

    /// Whether the row is laid out for prefix-LM attention.
    pub fn is_prefix_lm(&self) -> bool {
        !self.segment.is_empty()
    }

    /// The tokens in `range`, with everything known about them.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Sequence {
        fn cut<T: Copy>(values: &[T], range: &std::ops::Range<usize>) -> Vec<T> {
            match values.is_empty() {
                true => Vec::new(),
                false => values[range.clone()].to_vec(),
            }
        }
        Sequence {
            ids: cut(&self.ids, &range),
            loss_mask: cut(&self.loss_mask, &range),
            segment: cut(&self.segment, &range),
            prefix: cut(&self.prefix, &range),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Next-token labels aligned with positions `0..seq`: position i predicts token i+1 when that
    /// token is trained on; everything else (last position, padding) is -100.
    pub fn labels(&self, seq: usize) -> Vec<i64> {
        (0..seq)
            .map(|i| match self.ids.get(i + 1) {
                Some(&next) if self.loss_mask[i + 1] => next as i64,
                _ => -100,
            })
            .collect()
    }

    /// Number of tokens this row contributes to the loss.
    pub fn target_count(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// Training rows right-padded into a model batch, with their next-token labels (-100 where not
/// trained); rows of packed or prefix-LM examples keep their layout.
pub fn batch_of(
    rows: &[Sequence],
    pad_id: u32,
    device: &candle_core::Device,
) -> candle_core::Result<(crate::model::Batch, Vec<i64>)> {
    use crate::model::Batch;
    use crate::ops::PrefixLayout;
    let ids: Vec<Vec<u32>> = rows.iter().map(|s| s.ids.clone()).collect();
    let batch = if rows.iter().any(Sequence::is_prefix_lm) {
        let layouts: Vec<PrefixLayout> = rows
            .iter()
            .map(|s| PrefixLayout {
                segment: s.segment.clone(),
                prefix: s.prefix.clone(),
            })
            .collect();
        Batch::prefix_lm(&ids, &layouts, pad_id, device)?
    } else {
        Batch::right_padded(&ids, pad_id, device)?
    };
    let seq = batch.input_ids.dim(1)?;
    let labels = rows.iter().flat_map(|s| s.labels(seq)).collect();
    Ok((batch, labels))
}
