//! Which device a run computes on, from the user's spelling of it.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .with_context(|| format!("device {s:?}: expected cuda:N"))?
                .unwrap_or(0);
            Device::new_cuda(ordinal).map_err(|e| anyhow!(explain_cuda_failure(s, ordinal, &e)))
        }
        other => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
    }
}

/// Why `device` could not be opened, in the user's terms: the driver's error codes name the cause
/// (no driver, the link-time stub, no device, a driver older than the toolkit) far better than
/// the loader-level message candle passes up.
fn explain_cuda_failure(device: &str, ordinal: usize, err: &candle_core::Error) -> String {
    let detail = format!("{err:?}");
    let cause = if matches!(err, candle_core::Error::NotCompiledWithCudaSupport) {
        "this kiln binary was built without CUDA support (build with `--features cuda`, or use \
         the GPU bundle from scripts/gpu-bundle.sh)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_STUB_LIBRARY") {
        "no NVIDIA driver was found: the libcuda.so.1 loaded is a link-time stub, not a driver \
         (install the NVIDIA driver, or run on a machine with a GPU)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_NO_DEVICE") {
        "the NVIDIA driver is installed but sees no CUDA device".to_string()
    } else if detail.contains("CUDA_ERROR_INSUFFICIENT_DRIVER")
        || detail.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
    {
        "the NVIDIA driver is older than the CUDA release this binary was built with (see \
         `nvidia-smi` for the driver's CUDA version and rebuild the bundle with \
         KILN_CUDA_RELEASE set to it)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_INVALID_DEVICE") {
        format!("there is no CUDA device {ordinal} (`nvidia-smi -L` lists the devices)")
    } else {
        format!("the CUDA device could not be opened: {err}")
    };
    format!("device {device:?} is not available: {cause}")
}
