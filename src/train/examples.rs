//! What a run trains and evaluates on: supervised rows, or preference pairs.

use crate::data::{PreferencePair, Sequence, SequenceStream, Stream, StreamState};

/// The training examples in the order the run takes them.
pub enum TrainData {
    Sequences(SequenceStream),
    Pairs(Stream<PreferencePair>),
}

/// One step's global batch of [`TrainData`].
pub enum Batch {
    Sequences(Vec<Sequence>),
    Pairs(Vec<PreferencePair>),
}

/// Held-out examples.
pub enum EvalData {
    Sequences(Vec<Sequence>),
    Pairs(Vec<PreferencePair>),
}

impl From<SequenceStream> for TrainData {
    fn from(stream: SequenceStream) -> Self {
        TrainData::Sequences(stream)
    }
}

impl From<Stream<PreferencePair>> for TrainData {
    fn from(stream: Stream<PreferencePair>) -> Self {
        TrainData::Pairs(stream)
    }
}

impl From<Vec<Sequence>> for EvalData {
    fn from(sequences: Vec<Sequence>) -> Self {
        EvalData::Sequences(sequences)
    }
}

impl From<Vec<PreferencePair>> for EvalData {
    fn from(pairs: Vec<PreferencePair>) -> Self {
        EvalData::Pairs(pairs)
    }
}

impl TrainData {
    /// Examples (rows, or pairs) per epoch.
    pub fn per_epoch(&self) -> usize {
        match self {
            TrainData::Sequences(s) => s.sequences_per_epoch(),
            TrainData::Pairs(s) => s.sequences_per_epoch(),
        }
    }

    pub fn state(&self) -> StreamState {
        match self {
            TrainData::Sequences(s) => s.state(),
            TrainData::Pairs(s) => s.state(),
        }
    }

    pub fn restore(&mut self, state: StreamState) {
        match self {
            TrainData::Sequences(s) => s.restore(state),
            TrainData::Pairs(s) => s.restore(state),
        }
    }

    pub fn epoch_progress(&self) -> f64 {
        match self {
            TrainData::Sequences(s) => s.epoch_progress(),
            TrainData::Pairs(s) => s.epoch_progress(),
        }
    }

    pub fn next_batch(&mut self, n: usize) -> Batch {
        match self {
            TrainData::Sequences(s) => Batch::Sequences(s.next_batch(n)),
            TrainData::Pairs(s) => Batch::Pairs(s.next_batch(n)),
        }
    }

    pub fn is_pairs(&self) -> bool {
        matches!(self, TrainData::Pairs(_))
    }
}

impl Batch {
    /// Tokens of the batch (a pair's: both sequences').
    pub fn tokens(&self) -> usize {
        match self {
            Batch::Sequences(s) => s.iter().map(Sequence::len).sum(),
            Batch::Pairs(p) => p.iter().map(PreferencePair::len).sum(),
        }
    }
}

impl EvalData {
    pub fn is_empty(&self) -> bool {
        match self {
            EvalData::Sequences(s) => s.is_empty(),
            EvalData::Pairs(p) => p.is_empty(),
        }
    }
}
