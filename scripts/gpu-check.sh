#!/usr/bin/env bash
# Kiln on an NVIDIA GPU: builds with `cuda`, runs the parity checks on the device, trains the
# tiny and small presets for a few steps (tokens/s and MFU), times `kiln generate` and runs a
# torchrun-style NCCL job (needs libnccl: `pip install nvidia-nccl-cu13` and its lib on
# LD_LIBRARY_PATH, or the system's).
# Run from the repository root on a machine with a GPU, the CUDA toolkit (nvcc) and a Rust
# toolchain: `bash scripts/gpu-check.sh`. Prints one summary block at the end; put its numbers
# in the README (Performance).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu (compute capability $CUDA_COMPUTE_CAP)"

cargo build --release --locked --features cuda
kiln=target/release/kiln

# Parity on the device: the generic ops are what a GPU runs (fp32 logits and every gradient vs
# HF, fp16/bf16 forwards vs the fp32 reference, 20 AdamW steps vs PyTorch).
KILN_TEST_DEVICE=cuda cargo test --release --locked --features cuda --test parity_generic -- --nocapture 2>&1 \
  | tee /tmp/kiln-gpu-parity.log | grep -E "max abs diff|worst|test result"

out=$(mktemp -d)
summary=()
train_preset() { # preset dtype micro seq steps vocab
  local preset=$1 dtype=$2 micro=$3 seq=$4 steps=$5 vocab=$6 name="gpu-$1-$2"
  "$kiln" train recipes/quickstart.yaml --quiet \
    --set name="$name" --set device=cuda --set model.init.preset="$preset" \
    --set model.init.vocab_size="$vocab" \
    --set precision.compute="$dtype" --set data.seq_len="$seq" --set data.mode=pack \
    --set data.loss_on=all --set batch.global="$micro" --set batch.micro="$micro" \
    --set steps="$steps" --set schedule.warmup=0 --set eval.every=0 --set eval.task=loss --set data.eval=[] \
    --set checkpoint.dir="$out/ckpt" --set checkpoint.every=0 --set checkpoint.keep_last=1 \
    --set tracking.log_dir="$out/runs" > "$out/$name.log"
  # Median tokens/s over the steps after the first two (warm-up, kernel compilation).
  local tps
  tps=$(python3 - "$out/runs/$name/metrics.jsonl" <<'PY'
import json, statistics, sys
v = [r["value"] for r in map(json.loads, open(sys.argv[1])) if r["tag"] == "train/tokens_per_sec"]
print(f"{statistics.median(v[2:] or v):.0f}")
PY
)
  local params
  params=$(grep -o '([0-9.]* [MBk] parameters)' "$out/$name.log" | head -1)
  summary+=("train $preset $dtype micro $micro × seq $seq: $tps tokens/s $params")
}
# tiny on the bundled tokenizer's 1,024 words; small at GPT-J's 50,400 rows, as benches/train.rs.
train_preset tiny fp32 32 64 30 1024
train_preset small fp32 8 256 20 50400
train_preset small bf16 8 256 20 50400

# Generation: greedy, 64 new tokens, from a trained tiny checkpoint.
ckpt="$out/ckpt/gpu-tiny-fp32/$(cat "$out/ckpt/gpu-tiny-fp32/latest")"
start=$(date +%s.%N)
"$kiln" generate --model "$ckpt" --prompt "mnli hypothesis: the cat sat premise: a cat sat on the mat target:" \
  --max-new-tokens 64 --device cuda > /dev/null
end=$(date +%s.%N)
summary+=("generate batch 1, 64 new tokens: $(python3 -c "print(f'{64 / ($end - $start):.1f}')") new tokens/s (wall, incl. load)")

# NCCL: a torchrun-style job, one rank per GPU (2 when there are two, else 1), against one process
# training the same replicas; both losses go in the summary (equal up to float rounding).
gpus=$(nvidia-smi -L | wc -l)
world=$(( gpus >= 2 ? 2 : 1 ))
nccl_run() { # name world extra-env...
  local name=$1 world=$2
  "$kiln" train recipes/quickstart.yaml --quiet --set name="$name" --set device=cuda \
    --set batch.replicas=2 --set batch.micro=16 --set steps=40 --set schedule.warmup=4 --set eval.every=0 \
    --set eval.task=loss --set data.eval=[] --set checkpoint.dir="$out/ckpt" --set checkpoint.every=0 \
    --set tracking.log_dir="$out/runs"
}
for rank in $(seq 0 $((world - 1))); do
  RANK=$rank WORLD_SIZE=$world LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 \
    nccl_run gpu-nccl "$world" > "$out/nccl-$rank.log" 2>&1 &
done
wait
nccl_run gpu-one-process 1 > "$out/one-process.log" 2>&1
last_loss() { grep -o 'last loss [0-9.]*' "$1" | tail -1; }
summary+=("NCCL, $world rank(s) × $(( 2 / world )) replica(s): $(last_loss "$out/nccl-0.log"); one process, 2 replicas: $(last_loss "$out/one-process.log")")

echo
echo "== Kiln GPU check on $gpu =="
printf '%s\n' "${summary[@]}"
grep -E "test result" /tmp/kiln-gpu-parity.log
echo "MFU: 6 × parameters × tokens/s ÷ the GPU's peak (H100 SXM dense: 67 TFLOP/s fp32, 989 bf16)"
