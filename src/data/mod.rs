//! From datasets to token batches: sources → text-to-text templates → tokenize → pack or pad.

pub mod check;
pub mod fast_bpe;
pub mod fingerprint;
pub mod pack;
pub mod prepare;
pub mod preview;
pub mod source;
pub mod stream;
pub mod template;

pub use check::{check, Derived, Resolved};
pub use fingerprint::{FileDigest, SourceFingerprint};
pub use prepare::{
    load_split_records, prepare, render_split, tokenize_all, tokenize_example, DataStats,
    LoadedDataset, Prepared, Split,
};
pub use source::{load_records, Records};
pub use stream::{SequenceStream, StreamState};
pub use template::Rendered;

/// One training row as the model sees it: token ids and, per token, whether predicting that
/// token counts towards the loss (`loss_on: target` clears it for prompt tokens and padding).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Sequence {
    pub fn all_trained(ids: Vec<u32>) -> Self {
        let loss_mask = vec![true; ids.len()];
        Self { ids, loss_mask }
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
