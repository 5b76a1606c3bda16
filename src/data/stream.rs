//! The order training sees its examples (sequences, or preference pairs) in: shuffled per (seed, epoch), resumable from a state
//! small enough to live in `trainer_state.json`.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::Sequence;

/// Where a stream is: the epoch and how many sequences of it were already handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub epoch: u64,
    pub position: u64,
}

/// Examples in the order training takes them.
#[derive(Debug, Clone)]
pub struct Stream<T> {
    sequences: Vec<T>,
    seed: u64,
    shuffle: bool,
    order: Vec<usize>,
    state: StreamState,
}

/// The stream of supervised training rows.
pub type SequenceStream = Stream<Sequence>;

impl<T: Clone> Stream<T> {
    pub fn new(sequences: Vec<T>, seed: u64, shuffle: bool) -> Self {
        let mut stream = Self {
            sequences,
            seed,
            shuffle,
            order: Vec::new(),
            state: StreamState::default(),
        };
        stream.order = stream.epoch_order(0);
        stream
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.sequences.len()).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            order.shuffle(&mut rng);
        }
        order
    }

    pub fn sequences_per_epoch(&self) -> usize {
        self.sequences.len()
    }

    /// Every example, in their original order.
    pub fn examples(&self) -> &[T] {
        &self.sequences
    }

    /// Every example, in their original order, to change in place (the stream's order and
    /// position stay).
    pub fn examples_mut(&mut self) -> &mut [T] {
        &mut self.sequences
    }

    pub fn state(&self) -> StreamState {
        self.state
    }

    /// Epochs completed so far, fractional.
    pub fn epoch_progress(&self) -> f64 {
        self.state.epoch as f64 + self.state.position as f64 / self.sequences.len().max(1) as f64
    }

    /// Continues exactly where a stream with this state left off.
    pub fn restore(&mut self, state: StreamState) {
        self.order = self.epoch_order(state.epoch);
        self.state = state;
    }

    /// The next `n` sequences, crossing into the next epoch (reshuffled) when this one ends.
    pub fn next_batch(&mut self, n: usize) -> Vec<T> {
        assert!(
            !self.sequences.is_empty(),
            "a stream needs at least one sequence"
        );
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            if self.state.position as usize >= self.order.len() {
                self.state = StreamState {
                    epoch: self.state.epoch + 1,
                    position: 0,
                };
                self.order = self.epoch_order(self.state.epoch);
            }
            let index = self.order[self.state.position as usize];
            batch.push(self.sequences[index].clone());
            self.state.position += 1;
        }
        batch
    }
}
