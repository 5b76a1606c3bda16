//! Where each row of a global batch is computed. A step's `batch.global` rows are cut into
//! micro-steps of `batch.micro × batch.replicas` rows; micro-step `m`'s replica `r` takes rows
//! `m × micro × replicas + r × micro ..` of it; the job's replicas are spread evenly over its
//! ranks, and each replica's rows over its CPU workers. A row's place in the global batch (what
//! its dropout masks are drawn from) is therefore the same however the job is laid out.

use anyhow::{ensure, Result};

#[cfg(test)]
use crate::data::Sequence;
use crate::recipe::Recipe;

#[derive(Debug, Clone, Copy)]
pub struct BatchLayout {
    /// Rows per forward/backward on one replica (`batch.micro`).
    pub micro: usize,
    /// Replicas of the whole job (`batch.replicas`).
    pub replicas: usize,
    pub rank: usize,
    pub ranks: usize,
    /// CPU workers each replica's rows are split over (see [`crate::ops::workers_per_replica`]).
    pub workers_per_replica: usize,
}

/// One worker's rows of a micro-step (training rows, or preference pairs).
pub struct Shard<'s, T> {
    /// This rank's replica the rows belong to (`0..local_replicas`).
    pub local_replica: usize,
    /// The global batch index of the first row.
    pub first_row: usize,
    pub rows: &'s [T],
}

impl BatchLayout {
    /// The recipe's batch geometry on rank `rank` of `ranks`, checked against the data
    /// (`examples` per epoch); the workers are set later with [`Self::with_workers`].
    pub fn new(recipe: &Recipe, examples: usize, rank: usize, ranks: usize) -> Result<Self> {
        let batch = &recipe.batch;
        ensure!(
            batch.micro > 0 && batch.replicas > 0,
            "batch.micro and batch.replicas must be positive"
        );
        ensure!(
            batch.replicas.is_multiple_of(ranks),
            "batch.replicas ({}) must be a multiple of the number of ranks ({ranks}): it counts \
             the replicas of the whole job, and each rank runs batch.replicas / ranks of them (set \
             batch.replicas to {}, say, and batch.global to a multiple of batch.micro × that)",
            batch.replicas,
            ranks * batch.replicas.div_ceil(ranks)
        );
        let per_micro_step = batch.micro * batch.replicas;
        ensure!(
            batch.global > 0 && batch.global.is_multiple_of(per_micro_step),
            "batch.global ({}) must be a positive multiple of batch.micro × batch.replicas ({} × \
             {})",
            batch.global,
            batch.micro,
            batch.replicas
        );
        ensure!(examples > 0, "the training data has no sequences");
        Ok(Self {
            micro: batch.micro,
            replicas: batch.replicas,
            rank,
            ranks,
            workers_per_replica: 1,
        })
    }

    pub fn with_workers(self, workers_per_replica: usize) -> Self {
        Self {
            workers_per_replica,
            ..self
        }
    }

    /// The replicas this rank runs.
    pub fn local_replicas(&self) -> usize {
        self.replicas / self.ranks
    }

    /// Each local replica's share of `threads`.
    pub fn threads_per_replica(&self, threads: usize) -> usize {
        (threads / self.local_replicas()).max(1)
    }

    pub fn rows_per_micro_step(&self) -> usize {
        self.micro * self.replicas
    }

    /// This rank's shards of micro-step `micro_step`, whose rows are `rows`, in replica then
    /// worker order.
    pub fn shards<'s, T>(&self, micro_step: usize, rows: &'s [T]) -> Vec<Shard<'s, T>> {
        let local = self.local_replicas();
        let mine = self.rank * local..(self.rank + 1) * local;
        let mut shards = Vec::new();
        for (replica, replica_rows) in rows.chunks(self.micro).enumerate() {
            if !mine.contains(&replica) {
                continue;
            }
            let mut first_row = micro_step * self.rows_per_micro_step() + replica * self.micro;
            for rows in split_rows(replica_rows, self.workers_per_replica) {
                shards.push(Shard {
                    local_replica: replica - mine.start,
                    first_row,
                    rows,
                });
                first_row += rows.len();
            }
        }
        shards
    }
}

/// `rows` in at most `parts` contiguous, non-empty pieces whose sizes differ by at most one.
fn split_rows<T>(rows: &[T], parts: usize) -> Vec<&[T]> {
    let parts = parts.clamp(1, rows.len().max(1));
    let (base, extra) = (rows.len() / parts, rows.len() % parts);
    let mut pieces = Vec::with_capacity(parts);
    let mut start = 0;
    for part in 0..parts {
        let len = base + usize::from(part < extra);
        pieces.push(&rows[start..start + len]);
        start += len;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_into_near_equal_contiguous_pieces() {
        let rows: Vec<Sequence> = (0..8).map(|i| Sequence::all_trained(vec![i; 3])).collect();
        let sizes =
            |parts| -> Vec<usize> { split_rows(&rows, parts).iter().map(|p| p.len()).collect() };
        assert_eq!(sizes(1), [8]);
        assert_eq!(sizes(3), [3, 3, 2]);
        assert_eq!(sizes(8), [1; 8]);
        assert_eq!(sizes(20), [1; 8], "never an empty piece");
        let pieces = split_rows(&rows, 3);
        assert_eq!(pieces[1][0].ids, rows[3].ids, "pieces keep the row order");
        assert_eq!(split_rows(&rows[..0], 2).len(), 1);
    }

    #[test]
    fn every_row_has_one_place_whatever_the_layout() {
        let rows: Vec<Sequence> = (0..8).map(|i| Sequence::all_trained(vec![i; 2])).collect();
        // 2 micro × 2 replicas: one micro-step is 4 rows.
        let places = |ranks: usize, workers: usize| -> Vec<(u32, usize)> {
            let mut places = Vec::new();
            for rank in 0..ranks {
                let layout = BatchLayout {
                    micro: 2,
                    replicas: 2,
                    rank,
                    ranks,
                    workers_per_replica: workers,
                };
                for (m, step_rows) in rows.chunks(layout.rows_per_micro_step()).enumerate() {
                    for shard in layout.shards(m, step_rows) {
                        for (i, row) in shard.rows.iter().enumerate() {
                            places.push((row.ids[0], shard.first_row + i));
                        }
                    }
                }
            }
            places.sort();
            places
        };
        let expected: Vec<(u32, usize)> = (0..8).map(|i| (i, i as usize)).collect();
        assert_eq!(places(1, 1), expected);
        assert_eq!(places(2, 1), expected);
        assert_eq!(places(1, 2), expected);
        assert_eq!(places(2, 2), expected);
    }
}
