//! The collective on NCCL: GPU ranks, one GPU each, launched the torchrun way.
//!
//! Rank 0 makes NCCL's unique id and hands it to the others over TCP at `MASTER_ADDR:MASTER_PORT`;
//! NCCL then builds its own rings and trees. NCCL calls cannot be given a deadline, so a
//! watchdog thread ends the process when a check-in or barrier takes longer than the timeout
//! (torchrun then stops the other ranks).

use std::ffi::c_char;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor};

use super::Collective;
use crate::recipe::DistributedSpec;

pub struct Nccl {
    comm: Comm,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    timeout: Duration,
}

impl Nccl {
    pub fn init(
        rank: usize,
        size: usize,
        device: &str,
        master: &str,
        spec: &DistributedSpec,
    ) -> Result<Self> {
        let Device::Cuda(cuda) = crate::ops::parse_device(device)? else {
            bail!("NCCL needs a CUDA device, not {device}");
        };
        let timeout = Duration::from_secs(spec.timeout_secs);
        let id = share_unique_id(rank, size, master, timeout)?;
        let stream = cuda.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), rank, size, id)
            .map_err(|e| anyhow!("rank {rank}: NCCL could not join the job: {e:?}"))?;
        Ok(Self {
            comm,
            device: cuda,
            stream,
            rank,
            size,
            timeout,
        })
    }

    /// A fresh fp32 device buffer holding `tensor`'s values.
    fn buffer(&self, tensor: &Tensor) -> Result<CudaSlice<f32>> {
        let tensor = tensor.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            bail!("a tensor for NCCL is not on the GPU");
        };
        let start = layout.start_offset();
        let view = storage
            .as_cuda_slice::<f32>()?
            .slice(start..start + tensor.elem_count());
        Ok(self.stream.clone_dtod(&view)?)
    }

    fn tensor(&self, buffer: CudaSlice<f32>, like: &Tensor) -> Result<Tensor> {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buffer, self.device.clone()));
        Ok(
            Tensor::from_storage(storage, like.shape(), BackpropOp::none(), false)
                .to_dtype(like.dtype())?,
        )
    }

    /// Runs `work`; if it takes longer than the timeout, a watchdog ends this process saying
    /// `what` was late.
    fn within_timeout<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let (done, finished) = mpsc::channel::<()>();
        let (rank, timeout, what_owned) = (self.rank, self.timeout, what.to_string());
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(timeout) {
                eprintln!(
                    "error: rank {rank}: {what_owned} did not complete within {} s \
                     (distributed.timeout_secs): a rank is hung or dead; stopping. The last \
                     complete checkpoint is intact: `--resume latest` continues from it",
                    timeout.as_secs()
                );
                std::process::exit(3);
            }
        });
        let result = work();
        let _ = done.send(());
        let _ = watchdog.join();
        result
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn engine(&self) -> &'static str {
        "NCCL"
    }

    fn all_reduce_sum(&self, tensors: &mut [Tensor], what: &str) -> Result<()> {
        let mut buffers = (tensors.iter())
            .map(|t| self.buffer(t))
            .collect::<Result<Vec<_>>>()?;
        // One group: NCCL fuses the calls instead of launching one per tensor.
        group_start().map_err(|e| anyhow!("all-reduce of {what}: {e:?}"))?;
        for buffer in buffers.iter_mut() {
            self.comm
                .all_reduce_in_place(buffer, &ReduceOp::Sum)
                .map_err(|e| anyhow!("all-reduce of {what}: {e:?}"))?;
        }
        group_end().map_err(|e| anyhow!("all-reduce of {what}: {e:?}"))?;
        for (tensor, buffer) in tensors.iter_mut().zip(buffers) {
            *tensor = self.tensor(buffer, tensor)?;
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64], what: &str) -> Result<()> {
        let mut buffer = self.stream.clone_htod(values)?;
        self.comm
            .all_reduce_in_place(&mut buffer, &ReduceOp::Sum)
            .map_err(|e| anyhow!("all-reduce of {what}: {e:?}"))?;
        values.copy_from_slice(&self.stream.clone_dtoh(&buffer)?);
        Ok(())
    }

    fn broadcast(&self, root: usize, tensors: &mut [Tensor], what: &str) -> Result<()> {
        for tensor in tensors.iter_mut() {
            let mut buffer = self.buffer(tensor)?;
            self.comm
                .broadcast_in_place(&mut buffer, root as i32)
                .map_err(|e| anyhow!("broadcast of {what}: {e:?}"))?;
            *tensor = self.tensor(buffer, tensor)?;
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let send = self.stream.clone_htod(bytes)?;
        let mut all = self.stream.alloc_zeros::<u8>(bytes.len() * self.size)?;
        self.comm
            .all_gather(&send, &mut all)
            .map_err(|e| anyhow!("all-gather of {what}: {e:?}"))?;
        let all = self.stream.clone_dtoh(&all)?;
        Ok(all.chunks(bytes.len().max(1)).map(<[u8]>::to_vec).collect())
    }

    fn barrier(&self, what: &str) -> Result<()> {
        self.within_timeout(&format!("the barrier after {what}"), || {
            let mut one = [1.0];
            self.all_reduce_sum_f64(&mut one, what)?;
            self.synchronize()
        })
    }

    fn check_in(&self, step: u64, stop: bool) -> Result<bool> {
        self.within_timeout(&format!("the check-in of step {step}"), || {
            let mut reports = [step as f64, f64::from(u8::from(stop))];
            self.all_reduce_sum_f64(&mut reports, "the step check-in")?;
            if reports[0] != (step * self.size as u64) as f64 {
                bail!("the ranks went out of step at step {step}");
            }
            Ok(reports[1] > 0.0)
        })
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Rank 0 makes the id and serves it to each other rank over TCP; the others connect (retrying
/// while rank 0 starts) and read it.
fn share_unique_id(rank: usize, size: usize, master: &str, timeout: Duration) -> Result<Id> {
    const ID_BYTES: usize = 128;
    let deadline = Instant::now() + timeout;
    if rank == 0 {
        let id = Id::new().map_err(|e| anyhow!("NCCL could not make its unique id: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        if size > 1 {
            let listener = TcpListener::bind(master).with_context(|| {
                format!("rank 0 cannot listen on MASTER_ADDR:MASTER_PORT {master}")
            })?;
            listener.set_nonblocking(true)?;
            let mut served = 0;
            while served < size - 1 {
                match listener.accept() {
                    Ok((mut peer, _)) => {
                        peer.set_nonblocking(false)?;
                        peer.write_all(&bytes)?;
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            bail!(
                                "rank 0: only {served} of {} other ranks connected to {master} \
                                 within {} s",
                                size - 1,
                                timeout.as_secs()
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("rank 0: accepting the other ranks"),
                }
            }
        }
        return Ok(id);
    }
    loop {
        match TcpStream::connect(master) {
            Ok(mut stream) => {
                let mut bytes = [0u8; ID_BYTES];
                stream
                    .read_exact(&mut bytes)
                    .with_context(|| format!("rank {rank}: reading NCCL's id from {master}"))?;
                return Ok(Id::uninit(bytes.map(|b| b as c_char)));
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "rank {rank}: rank 0 did not answer at MASTER_ADDR:MASTER_PORT {master} \
                         within {} s",
                        timeout.as_secs()
                    )
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
