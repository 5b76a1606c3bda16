//! One training across many processes: the collective operations the trainer needs (all-reduce,
//! broadcast, all-gather, barrier) behind one small interface, on a trusted engine — MPI for CPU
//! ranks (`mpirun`, `srun`; the `mpi` feature), NCCL for GPU ranks (torchrun's environment; the
//! `cuda` feature) — and the launch environment that says which.
//!
//! Semantics: `batch.replicas` counts replicas over the whole job; each of the N ranks runs
//! `replicas / N` of them, on exactly the rows those replicas would train in one process. Every
//! rank reads the whole data stream (so the data cursor and its shuffle are global and a
//! checkpoint's position means the same to any world size) and keeps a full copy of the
//! weights; rank 0 alone writes checkpoints, metrics and tracking.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "cuda")]
mod nccl;

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::recipe::DistributedSpec;

/// The collective operations of a data-parallel job. Every rank calls the same operations in
/// the same order; `what` names the operation in the error a late or dead rank causes.
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// "single process", "MPI", "NCCL".
    fn engine(&self) -> &'static str;
    /// Replaces every fp32 tensor by its sum over the ranks.
    fn all_reduce_sum(&self, tensors: &mut [Tensor], what: &str) -> Result<()>;
    /// Sums `values` over the ranks, in place.
    fn all_reduce_sum_f64(&self, values: &mut [f64], what: &str) -> Result<()>;
    /// Replaces every tensor by rank `root`'s (the same shapes on every rank).
    fn broadcast(&self, root: usize, tensors: &mut [Tensor], what: &str) -> Result<()>;
    /// Every rank's `bytes` (the same length on every rank), in rank order.
    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>>;
    /// Waits for every rank, at most the job's timeout; a rank that does not arrive in time
    /// stops the job.
    fn barrier(&self, what: &str) -> Result<()>;
    /// Every rank reports that it reached `step` (after its forward and backward, before the
    /// gradients are exchanged) and whether it was asked to stop; returns whether any rank
    /// was, so that all stop after the same step. A rank that does not report within the
    /// timeout is named and the job stops.
    fn check_in(&self, step: u64, stop: bool) -> Result<bool>;
    /// Ends every rank of the job now (after an error on this one), with `code`.
    fn abort(&self, code: i32) -> !;
}

/// One process: every operation is the identity.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single process"
    }
    fn all_reduce_sum(&self, _: &mut [Tensor], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: usize, _: &mut [Tensor], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, bytes: &[u8], _: &str) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn check_in(&self, _: u64, stop: bool) -> Result<bool> {
        Ok(stop)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// How this process was launched, read from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    Single,
    /// Started by `mpirun`/`mpiexec` or `srun`: MPI's own runtime knows the rank.
    Mpi {
        launcher: &'static str,
        size: usize,
    },
    /// torchrun's convention (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    /// `MASTER_PORT`), for NCCL.
    Torchrun {
        rank: usize,
        size: usize,
        local_rank: usize,
        master: String,
    },
}

impl Launch {
    /// Reads the launch from `env` (the process environment in [`Launch::from_env`]).
    pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(value) => match value.trim().parse() {
                    Ok(n) => Ok(Some(n)),
                    Err(_) => bail!("environment variable {name}={value:?} is not a number"),
                },
            }
        };
        if let Some(size) = number("WORLD_SIZE")? {
            let rank = number("RANK")?.ok_or_else(|| {
                anyhow::anyhow!("WORLD_SIZE is set but RANK is not (torchrun sets both)")
            })?;
            ensure!(
                rank < size,
                "RANK={rank} is not below WORLD_SIZE={size} (ranks count from 0)"
            );
            let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
            let addr = env("MASTER_ADDR");
            let port = number("MASTER_PORT")?;
            let master = match (addr, port) {
                (Some(addr), Some(port)) => format!("{addr}:{port}"),
                _ if size == 1 => "127.0.0.1:0".into(),
                _ => bail!(
                    "WORLD_SIZE={size} needs MASTER_ADDR and MASTER_PORT (the address rank 0 \
                     listens on to share NCCL's unique id), as torchrun sets them"
                ),
            };
            return Ok(Launch::Torchrun {
                rank,
                size,
                local_rank,
                master,
            });
        }
        let launchers = [
            ("OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"),
            ("PMI_SIZE", "mpiexec (PMI)"),
            ("PMIX_SIZE", "a PMIx launcher"),
            ("SLURM_NTASKS", "srun"),
        ];
        for (variable, launcher) in launchers {
            // SLURM_NTASKS is also set inside an `sbatch` script outside `srun`, where only
            // SLURM_STEP_ID says a task was launched.
            if variable == "SLURM_NTASKS" && env("SLURM_STEP_ID").is_none() {
                continue;
            }
            if let Some(size) = number(variable)? {
                if size > 1 {
                    return Ok(Launch::Mpi { launcher, size });
                }
            }
        }
        Ok(Launch::Single)
    }

    pub fn from_env() -> Result<Self> {
        Self::detect(|name| std::env::var(name).ok())
    }
}

/// The collective for this launch: MPI for CPU ranks, NCCL for GPU ranks, or a single process.
/// `device` is the recipe's; a GPU rank's is `cuda:LOCAL_RANK` (returned).
pub fn connect(
    launch: &Launch,
    device: &str,
    spec: &DistributedSpec,
) -> Result<(Box<dyn Collective>, String)> {
    let gpu = device.starts_with("cuda");
    match launch {
        Launch::Single => Ok((Box::new(SingleProcess), device.to_string())),
        Launch::Mpi { launcher, size } => {
            ensure!(
                !gpu,
                "launched by {launcher} with {size} ranks and device {device}: GPU ranks \
                 exchange gradients over NCCL, which takes torchrun's environment (RANK, \
                 WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; under Slurm set them from \
                 SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID)"
            );
            connect_mpi(launcher, *size, spec).map(|c| (c, device.to_string()))
        }
        Launch::Torchrun {
            rank,
            size,
            local_rank,
            master,
        } => {
            // Schedulers that always set WORLD_SIZE=1 start plain single CPU processes.
            if !gpu && *size == 1 {
                return Ok((Box::new(SingleProcess), device.to_string()));
            }
            ensure!(
                gpu,
                "a torchrun-style launch (WORLD_SIZE={size}) on device {device}: CPU ranks \
                 exchange gradients over MPI, so launch them with `mpirun -np {size} kiln train \
                 ...` (or srun) and a kiln built with `--features mpi`"
            );
            let device = match device {
                "cuda" => format!("cuda:{local_rank}"),
                other => other.to_string(),
            };
            connect_nccl(*rank, *size, &device, master, spec).map(|c| (c, device))
        }
    }
}

#[cfg(feature = "mpi")]
fn connect_mpi(_: &str, _: usize, spec: &DistributedSpec) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi::Mpi::init(spec)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(launcher: &str, size: usize, _: &DistributedSpec) -> Result<Box<dyn Collective>> {
    bail!(
        "launched by {launcher} with {size} ranks, but this kiln was built without MPI: build it \
         with `cargo build --release --features mpi` (needs an MPI library, e.g. Debian's \
         libopenmpi-dev, and libclang-dev)"
    )
}

#[cfg(feature = "cuda")]
fn connect_nccl(
    rank: usize,
    size: usize,
    device: &str,
    master: &str,
    spec: &DistributedSpec,
) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl::Nccl::init(
        rank, size, device, master, spec,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn connect_nccl(
    _: usize,
    size: usize,
    _: &str,
    _: &str,
    _: &DistributedSpec,
) -> Result<Box<dyn Collective>> {
    bail!(
        "a torchrun-style launch with WORLD_SIZE={size} needs NCCL: build kiln with `--features \
         cuda`"
    )
}

/// CPU threads for one rank by default: the machine's cores shared by the ranks the launcher
/// put on it.
pub fn threads_per_rank() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local_ranks = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "LOCAL_WORLD_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.parse::<usize>().ok())
    .unwrap_or(1);
    (cores / local_ranks.max(1)).max(1)
}

/// Checks before any step that every rank runs the same Kiln on the same recipe and data:
/// each rank's fingerprint of them is gathered and compared, and every rank fails with the
/// same message naming the ranks that differ.
pub fn check_same_job(
    collective: &dyn Collective,
    recipe_json: &str,
    data_fingerprint: &str,
) -> Result<()> {
    if collective.size() == 1 {
        return Ok(());
    }
    let version = Sha256::digest(env!("CARGO_PKG_VERSION").as_bytes());
    let recipe = Sha256::digest(recipe_json.as_bytes());
    let data = Sha256::digest(data_fingerprint.as_bytes());
    let mine = [version.as_slice(), recipe.as_slice(), data.as_slice()].concat();
    let all = collective.all_gather_bytes(&mine, "the start-up check of recipes and versions")?;
    let parts = [
        ("Kiln version", 0..32),
        ("resolved recipe", 32..64),
        ("training data", 64..96),
    ];
    let mut differences = Vec::new();
    for (what, range) in parts {
        let differing: Vec<String> = (all.iter().enumerate())
            .filter(|(_, theirs)| theirs[range.clone()] != all[0][range.clone()])
            .map(|(rank, _)| rank.to_string())
            .collect();
        if !differing.is_empty() {
            differences.push(format!(
                "the {what} of rank(s) {} differs from rank 0's",
                differing.join(", ")
            ));
        }
    }
    ensure!(
        differences.is_empty(),
        "the {} ranks of this job do not run the same training: {}. Every rank must run the \
         same kiln build with the same recipe file, --set overrides and data",
        collective.size(),
        differences.join("; ")
    );
    Ok(())
}

/// The parameters (by index, in order) whose optimizer state each of `size` ranks keeps under
/// ZeRO-1: contiguous runs, cut so that every rank's share of elements is as near 1/N as whole
/// tensors allow (a tensor goes to the rank whose even share holds its middle element).
pub fn optimizer_shards(sizes: &[usize], size: usize) -> Vec<Range<usize>> {
    let total: usize = sizes.iter().sum();
    let mut ends = vec![0; size];
    let mut before = 0usize;
    for (i, &n) in sizes.iter().enumerate() {
        let middle = before as f64 + n as f64 / 2.0;
        let owner = ((middle * size as f64 / total.max(1) as f64) as usize).min(size - 1);
        for end in ends.iter_mut().skip(owner) {
            *end = i + 1;
        }
        before += n;
    }
    ends[size - 1] = sizes.len();
    (0..size)
        .map(|r| if r == 0 { 0 } else { ends[r - 1] }..ends[r])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            (pairs.iter())
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launchers_are_told_apart_by_their_environment() {
        assert_eq!(Launch::detect(env(&[])).unwrap(), Launch::Single);
        assert_eq!(
            Launch::detect(env(&[("OMPI_COMM_WORLD_SIZE", "4")])).unwrap(),
            Launch::Mpi {
                launcher: "mpirun (Open MPI)",
                size: 4
            }
        );
        // Inside an sbatch script but outside srun: one process.
        assert_eq!(
            Launch::detect(env(&[("SLURM_NTASKS", "8")])).unwrap(),
            Launch::Single
        );
        assert_eq!(
            Launch::detect(env(&[("SLURM_NTASKS", "8"), ("SLURM_STEP_ID", "0")])).unwrap(),
            Launch::Mpi {
                launcher: "srun",
                size: 8
            }
        );
        let torchrun = [
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        assert_eq!(
            Launch::detect(env(&torchrun)).unwrap(),
            Launch::Torchrun {
                rank: 1,
                size: 2,
                local_rank: 1,
                master: "10.0.0.1:29500".into()
            }
        );
        let no_master = Launch::detect(env(&[("WORLD_SIZE", "2"), ("RANK", "0")]));
        assert!(no_master
            .unwrap_err()
            .to_string()
            .contains("WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT"));
        let bad = Launch::detect(env(&[("WORLD_SIZE", "two")]));
        assert!(bad.unwrap_err().to_string().contains("WORLD_SIZE=\"two\""));
        let over = Launch::detect(env(&[("WORLD_SIZE", "2"), ("RANK", "2")]));
        assert!(over.unwrap_err().to_string().contains("RANK=2"));
    }

    #[test]
    fn a_launch_on_the_wrong_device_kind_says_which_launcher_to_use() {
        let mpi = Launch::Mpi {
            launcher: "mpirun (Open MPI)",
            size: 2,
        };
        let err = connect(&mpi, "cuda", &DistributedSpec::default())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains(
                "launched by mpirun (Open MPI) with 2 ranks and device cuda: GPU ranks exchange \
                 gradients over NCCL"
            ),
            "{err}"
        );
        let torchrun = Launch::Torchrun {
            rank: 0,
            size: 2,
            local_rank: 0,
            master: "127.0.0.1:1".into(),
        };
        let err = connect(&torchrun, "cpu", &DistributedSpec::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("mpirun -np 2"), "{err}");
        let alone = Launch::Torchrun {
            rank: 0,
            size: 1,
            local_rank: 0,
            master: "127.0.0.1:0".into(),
        };
        let (single, device) = connect(&alone, "cpu", &DistributedSpec::default()).unwrap();
        assert_eq!((single.size(), device.as_str()), (1, "cpu"));
        #[cfg(not(feature = "mpi"))]
        {
            let err = connect(&mpi, "cpu", &DistributedSpec::default())
                .err()
                .unwrap();
            assert!(err.to_string().contains("--features mpi"), "{err}");
        }
    }

    #[test]
    fn optimizer_shards_cover_every_parameter_once_and_near_evenly() {
        let sizes = [10, 10, 10, 10, 40, 10, 10];
        for size in 1..=4 {
            let shards = optimizer_shards(&sizes, size);
            assert_eq!(shards.len(), size);
            assert_eq!(shards[0].start, 0);
            assert_eq!(shards[size - 1].end, sizes.len());
            for pair in shards.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "{shards:?}");
            }
        }
        let halves: Vec<usize> = (optimizer_shards(&sizes, 2).into_iter())
            .map(|shard| shard.map(|i| sizes[i]).sum())
            .collect();
        assert_eq!(
            halves,
            [40, 60],
            "the 40-element tensor's middle is in the second half"
        );
        let quarters = optimizer_shards(&[25; 8], 4);
        assert_eq!(quarters, [0..2, 2..4, 4..6, 6..8]);
        // More ranks than tensors: some ranks own nothing, every tensor is owned once.
        let sparse = optimizer_shards(&[5, 5], 4);
        assert_eq!(
            sparse.iter().map(|s| s.len()).sum::<usize>(),
            2,
            "{sparse:?}"
        );
    }
}
