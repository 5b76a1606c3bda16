# Sourced by the GPU bundle's launcher (`kiln-gpu/kiln`) and check (`kiln-gpu/gpu-check`): puts
# the NVIDIA driver and CUDA's libraries that the CUDA build of kiln needs on LD_LIBRARY_PATH,
# from whichever is present, and says on standard error which it used (KILN_GPU_ENV_QUIET=1 to
# keep quiet). Returns non-zero, naming what is missing, when a library cannot be found.
#
# Where it looks, first to last: KILN_CUDA_LIBS (folders, separated by ':'); the system's (the
# loader's cache, LD_LIBRARY_PATH, /usr/local/cuda and the driver's usual folders); the `nvidia-*`
# wheels of Python (KILN_PYTHON, else python3: `site-packages/nvidia/cu13/lib`, `nvidia/*/lib`).
# The driver stub the bundle carries is used only when no driver exists at all, so a CPU-only
# machine can still run CPU recipes; it is never put before a real driver.

kiln_gpu_env_main() {
  local bundle sonames say candidates=() dir
  bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  say() { [ "${KILN_GPU_ENV_QUIET:-0}" = 1 ] || echo "gpu-env: $*" >&2; }
  sonames=$(cat "$bundle/lib/needed.txt")

  local IFS_saved=$IFS
  IFS=:
  for dir in ${KILN_CUDA_LIBS:-}; do [ -n "$dir" ] && candidates+=("$dir|KILN_CUDA_LIBS"); done
  for dir in ${LD_LIBRARY_PATH:-}; do [ -n "$dir" ] && candidates+=("$dir|LD_LIBRARY_PATH"); done
  IFS=$IFS_saved
  for dir in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
    candidates+=("$dir|system")
  done
  local python site
  for python in ${KILN_PYTHON:-} python3 python; do
    command -v "$python" >/dev/null 2>&1 || continue
    for site in $("$python" -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib'], p['platlib'])" 2>/dev/null); do
      for dir in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib; do
        [ -d "$dir" ] && candidates+=("$dir|python wheels of $(command -v "$python")")
      done
    done
  done

  local cache
  cache=$( { /sbin/ldconfig -p || ldconfig -p; } 2>/dev/null)
  local soname entry found where added=":" missing=()
  for soname in libcuda.so.1 $sonames; do
    found=""
    for entry in "${candidates[@]}"; do
      dir=${entry%%|*}
      if [ -e "$dir/$soname" ]; then found=$dir; where=${entry#*|}; break; fi
    done
    if [ -z "$found" ]; then
      dir=$(printf '%s\n' "$cache" | awk -v s="$soname" '$1 == s && /x86-64/ {print $NF; exit}')
      if [ -n "$dir" ]; then found=$(dirname "$dir"); where="system (loader cache)"; fi
    fi
    if [ -z "$found" ]; then
      if [ "$soname" = libcuda.so.1 ]; then
        say "driver: none found (no libcuda.so.1); using the bundle's link-time stub: CPU recipes run, device cuda reports that no driver exists"
        found="$bundle/lib/driver-stub"
        where="stub"
      else
        missing+=("$soname")
        continue
      fi
    else
      say "$soname: $found ($where)"
    fi
    case "$added" in *":$found:"*) ;; *) added="$added$found:" ;; esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu-env: error: CUDA libraries not found: ${missing[*]}. Install them (e.g. \`pip install nvidia-cublas nvidia-curand nvidia-cuda-runtime nvidia-cuda-nvrtc nvidia-nccl-cu13\` for CUDA 13) or name their folder in KILN_CUDA_LIBS" >&2
    return 1
  fi
  added=${added#:}
  added=${added%:}
  # Found folders go first, in the order found; the stub's folder can only be among them when no
  # real driver was found anywhere.
  export LD_LIBRARY_PATH="$added${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

kiln_gpu_env_main
