//! The collective on MPI (Open MPI, MPICH, a vendor's): CPU ranks on one machine or many.
//!
//! Bulk data goes through MPI's blocking collectives (its tuned algorithms); the per-step
//! check-in and the barriers wait with a deadline, so that a hung rank is named and the job is
//! stopped instead of waiting forever. A rank that dies is seen by the launcher, which ends the
//! job itself.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use super::Collective;
use crate::recipe::DistributedSpec;

/// Messages of the check-in protocol carry this tag.
const CHECK_IN_TAG: i32 = 7_100;

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Gradients are summed this many elements at a time (`distributed.bucket_mib`).
    bucket_elems: usize,
    // Dropped last: finalizes MPI.
    _universe: Universe,
}

impl Mpi {
    pub fn init(spec: &DistributedSpec) -> Result<Self> {
        // Only the training loop's thread calls MPI; rayon's workers never do.
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .context("MPI could not be initialized (was it initialized twice?)")?;
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            timeout: Duration::from_secs(spec.timeout_secs),
            bucket_elems: (spec.bucket_mib << 20) / 4,
            _universe: universe,
        })
    }

    /// Stops the job because `what` did not finish in time.
    fn late(&self, what: &str, who: &str) -> ! {
        eprintln!(
            "error: rank {}: {who} did not {what} within {} s (distributed.timeout_secs): a rank \
             is hung or dead; stopping every rank. The last complete checkpoint is intact: \
             `--resume latest` continues from it",
            self.rank,
            self.timeout.as_secs()
        );
        self.world.abort(3)
    }

    /// Waits for `request` until `deadline`; past it, stops the job saying `who` did not `what`
    /// (the request is never dropped unfinished: the job ends first).
    fn complete_or_stop<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        deadline: Instant,
        request: Request<'a, D, S>,
        what: &str,
        who: &str,
    ) {
        let mut request = Some(request);
        let finished = self.wait_until(deadline, || {
            match request.take().expect("polled until done").test() {
                Ok(_) => true,
                Err(pending) => {
                    request = Some(pending);
                    false
                }
            }
        });
        if !finished {
            self.late(what, who);
        }
    }

    /// Polls `done` until it says finished or the deadline passes.
    fn wait_until(&self, deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
        let mut spins = 0u32;
        loop {
            if done() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            spins += 1;
            // Spinning keeps latency low for the common quick answer; sleeping spares the core
            // while a slow rank (evaluation, a checkpoint) is awaited.
            if spins > 1_000 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn engine(&self) -> &'static str {
        "MPI"
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor], what: &str) -> Result<()> {
        let mut start = 0;
        while start < tensors.len() {
            // A bucket: whole tensors up to the bucket size (at least one).
            let mut end = start + 1;
            let mut len = tensors[start].elem_count();
            while end < tensors.len() && len + tensors[end].elem_count() <= self.bucket_elems {
                len += tensors[end].elem_count();
                end += 1;
            }
            let mut mine = Vec::with_capacity(len);
            for tensor in &tensors[start..end] {
                mine.extend(
                    tensor
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            let mut sum = vec![0f32; len];
            self.world
                .all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
            drop(mine);
            let mut offset = 0;
            for tensor in &mut tensors[start..end] {
                let n = tensor.elem_count();
                *tensor =
                    Tensor::from_slice(&sum[offset..offset + n], tensor.shape(), tensor.device())
                        .with_context(|| format!("all-reduce of {what}"))?;
                offset += n;
            }
            start = end;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64], _what: &str) -> Result<()> {
        let mine = values.to_vec();
        self.world
            .all_reduce_into(&mine[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, root: usize, tensors: &mut [Tensor], what: &str) -> Result<()> {
        let root_process = self.world.process_at_rank(root as i32);
        for tensor in tensors.iter_mut() {
            let (shape, dtype) = (tensor.shape().clone(), tensor.dtype());
            let mut values = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            root_process.broadcast_into(&mut values[..]);
            if self.rank != root {
                *tensor = Tensor::from_vec(values, shape, tensor.device())?
                    .to_dtype(dtype)
                    .with_context(|| format!("broadcast of {what}"))?;
            }
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8], _what: &str) -> Result<Vec<Vec<u8>>> {
        let mut all = vec![0u8; bytes.len() * self.size];
        self.world.all_gather_into(bytes, &mut all[..]);
        Ok(all.chunks(bytes.len().max(1)).map(<[u8]>::to_vec).collect())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        // Rank 0 is the one that works alone before these barriers.
        self.complete_or_stop(
            deadline,
            self.world.immediate_barrier(),
            &format!("finish {what}"),
            "a rank (rank 0 if it was writing)",
        );
        Ok(())
    }

    fn check_in(&self, step: u64, stop: bool) -> Result<bool> {
        let deadline = Instant::now() + self.timeout;
        let mine = [step, u64::from(stop)];
        if self.rank == 0 {
            let mut reports = vec![[0u64; 2]; self.size];
            reports[0] = mine;
            let mut arrived = vec![false; self.size];
            arrived[0] = true;
            mpi::request::scope(|scope| {
                let mut pending: Vec<_> = (reports.iter_mut().enumerate().skip(1))
                    .map(|(rank, slot)| {
                        let process = self.world.process_at_rank(rank as i32);
                        Some((
                            rank,
                            process.immediate_receive_into_with_tag(
                                scope,
                                &mut slot[..],
                                CHECK_IN_TAG,
                            ),
                        ))
                    })
                    .collect();
                let all_in = self.wait_until(deadline, || {
                    for entry in pending.iter_mut() {
                        if let Some((rank, request)) = entry.take() {
                            match request.test() {
                                Ok(_) => arrived[rank] = true,
                                Err(request) => *entry = Some((rank, request)),
                            }
                        }
                    }
                    pending.iter().all(Option::is_none)
                });
                if !all_in {
                    let missing: Vec<String> = (arrived.iter().enumerate())
                        .filter(|(_, &a)| !a)
                        .map(|(rank, _)| rank.to_string())
                        .collect();
                    self.late(
                        &format!("reach step {step}"),
                        &format!("rank(s) {}", missing.join(", ")),
                    );
                }
            });
            if let Some((rank, report)) = (reports.iter().enumerate()).find(|(_, r)| r[0] != step) {
                anyhow::bail!(
                    "rank {rank} reported step {} while rank 0 is at step {step}: the ranks \
                     went out of step",
                    report[0]
                );
            }
            let verdict = [u64::from(reports.iter().any(|r| r[1] != 0))];
            for rank in 1..self.size {
                self.world
                    .process_at_rank(rank as i32)
                    .send_with_tag(&verdict[..], CHECK_IN_TAG);
            }
            Ok(verdict[0] != 0)
        } else {
            let root = self.world.process_at_rank(0);
            root.send_with_tag(&mine[..], CHECK_IN_TAG);
            let mut verdict = [0u64; 1];
            mpi::request::scope(|scope| {
                let request =
                    root.immediate_receive_into_with_tag(scope, &mut verdict[..], CHECK_IN_TAG);
                let what = format!("answer the check-in of step {step}");
                self.complete_or_stop(deadline, request, &what, "rank 0");
            });
            Ok(verdict[0] != 0)
        }
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
