#!/usr/bin/env bash
# The GPU check, run from the GPU bundle on a machine with an NVIDIA GPU, its driver, CUDA's
# libraries and Python with torch/transformers/peft; no Rust, no network:
#
#   kiln-gpu/gpu-check [OUT_DIR]          # OUT_DIR default: ./gpu-check-results
#
# Each part reports its own result, so one failure does not hide the rest; the whole check keeps
# within KILN_GPU_CHECK_BUDGET seconds (default 460: under 8 minutes on an H100/H200), skipping
# (and saying so) what would not fit. OUT_DIR/summary.md holds everything; OUT_DIR/*.log the
# detail. KILN_GPU_CHECK_SKIP="part-or-run ..." leaves parts (or single runs) out; KILN_GPU_CHECK_DEVICE=cpu (with a
# stand-in nvidia-smi) runs the check's plumbing without a GPU, as scripts/gpu-bundle.sh does.
# Parts, in order:
#   parity     fp32 logits and every gradient vs the HF/PyTorch fixtures, fp16/bf16 forwards,
#              20 AdamW steps (the device parity tests)
#   small      training tokens/s and MFU of the `small` preset, 8 x 256, fp32 and bf16, Kiln and
#              PyTorch + HF side by side
#   6b-lora    a GPT-J-6B-shaped LoRA step in bf16 at 1 x 1024 and 8 x 1024 (peak device memory
#              vs Kiln's estimate), Kiln and PyTorch + HF + PEFT
#   generate   new tokens/s at batch 1 and 16 (Kiln's bench, HF generate)
#   eval       `kiln eval` of 1,000 MNLI validation rows
#   nccl       a 1-rank torchrun-style job on NCCL, its losses equal to a single-process run's
#   6b-full    one full fine-tune step of the 6B shape (fp32 master weights and AdamW states,
#              bf16 compute), where the GPU has the memory Kiln estimates
set -uo pipefail
bundle=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
out=$(mkdir -p "${1:-$PWD/gpu-check-results}" && cd "${1:-$PWD/gpu-check-results}" && pwd)
budget=${KILN_GPU_CHECK_BUDGET:-460}
started=$(date +%s)
work=${KILN_GPU_CHECK_WORK:-$(mktemp -d)}
results="$out/results.jsonl"
: > "$results"
python=${KILN_PYTHON:-python3}
ref="$bundle/gpu_ref.py"

# shellcheck source=gpu-env.sh
if ! source "$bundle/gpu-env.sh" 2> "$out/libraries.log"; then
  cat "$out/libraries.log" >&2
  echo "gpu-check: the CUDA libraries kiln needs are missing (see above)" >&2
  exit 1
fi
device=${KILN_GPU_CHECK_DEVICE:-cuda}
small_steps=${KILN_GPU_CHECK_SMALL_STEPS:-20}
small_batch=${KILN_GPU_CHECK_SMALL_BATCH:-8}
eval_rows=${KILN_GPU_CHECK_EVAL_ROWS:-1000}
big_preset=${KILN_GPU_CHECK_BIG_PRESET:-gptj-6b}
export KILN_GPU_ENV_QUIET=1 KILN_TEST_ROOT="$bundle" KILN_TEST_DEVICE="$device"
kiln="$bundle/bin/kiln"
tokenizer="$bundle/shared/tokenizers/gpt2"
mnli="$bundle/shared/data/mnli/validation_matched_1000.jsonl"

record() { # part name status seconds json-extra
  printf '{"part": "%s", "name": "%s", "status": "%s", "seconds": %s, "detail": %s}\n' \
    "$1" "$2" "$3" "$4" "${5:-null}" >> "$results"
  "$python" "$ref" summarize --results "$results" --out "$out" > /dev/null 2>&1 || true
}
remaining() { echo $(( budget - ($(date +%s) - started) )); }

# run PART NAME TIMEOUT COMMAND...: the command's output goes to OUT/NAME.log; it passes on exit
# status 0. Its time limit is the smaller of TIMEOUT and what is left of the budget.
last_seconds=0
run() {
  local part=$1 name=$2 limit=$3; shift 3
  local left; left=$(remaining)
  case " ${KILN_GPU_CHECK_SKIP:-} " in *" $part "*|*" $name "*)
    echo "gpu-check: $name: not run (KILN_GPU_CHECK_SKIP)"
    record "$part" "$name" "not run (skipped)" 0
    return 2 ;;
  esac
  if [ "$left" -lt 20 ]; then
    echo "gpu-check: $name: not run (the budget of $budget s is spent)"
    record "$part" "$name" "not run (budget)" 0
    return 2
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s.%N)
  timeout --signal=KILL "$limit" "$@" > "$out/$name.log" 2>&1
  local status=$?
  last_seconds=$("$python" -c "import time; print(f'{time.time() - $t0:.1f}')")
  if [ $status -eq 0 ]; then
    echo "gpu-check: $name: ok (${last_seconds} s)"
    return 0
  elif [ $status -eq 137 ]; then
    echo "gpu-check: $name: TIMED OUT after $limit s (see $out/$name.log)"
    record "$part" "$name" "timed out after $limit s" "$last_seconds"
    return 1
  fi
  echo "gpu-check: $name: FAILED, exit $status (see $out/$name.log)"
  record "$part" "$name" "failed (exit $status): $(tail -n 3 "$out/$name.log" | tr '\n"\\' "   " | cut -c1-300)" "$last_seconds"
  return 1
}

# Peak device memory of what runs between memory_start and memory_stop, from nvidia-smi's
# samples every 100 ms, above what was in use before.
memory_start() {
  memory_base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$work/memory.samples" 2>/dev/null &
  memory_pid=$!
}
memory_stop() {
  kill "$memory_pid" 2>/dev/null; wait "$memory_pid" 2>/dev/null
  sort -n "$work/memory.samples" | tail -1 | awk -v base="$memory_base" '{print $1 - base}'
}

# --- the machine -----------------------------------------------------------------------------
{
  echo "{\"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)\","
  echo " \"driver\": \"$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0)\","
  echo " \"memory_mib\": $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0),"
  echo " \"compute_capability\": \"$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0)\","
  echo " \"python\": $("$python" "$ref" versions 2>/dev/null || echo null),"
  echo " \"bundle\": $("$python" -c "import json,sys; print(json.dumps(open(sys.argv[1]).read()))" "$bundle/BUILD"),"
  echo " \"libraries\": $("$python" -c "import json,sys; print(json.dumps(open(sys.argv[1]).read()))" "$out/libraries.log")}"
} > "$out/machine.json"
nvidia-smi > "$out/nvidia-smi.log" 2>&1
gpu_memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)

# --- parity ----------------------------------------------------------------------------------
if run parity parity 180 "$bundle/bin/parity_generic" --test-threads=1 --nocapture; then
  detail=$("$python" "$ref" parity-detail --log "$out/parity.log") || detail=null
  record parity parity pass "$last_seconds" "$detail"
fi

# --- training ----------------------------------------------------------------------------------
# recipe NAME MODEL_DIR DTYPE MICRO SEQ STEPS LORA(true|false): a recipe of the check's own, on
# the MNLI rows in Graphcore's format, packed so that every row is full.
recipe() {
  local name=$1 model=$2 dtype=$3 micro=$4 seq=$5 steps=$6 lora=$7
  cat > "$work/$name.yaml" <<YAML
name: $name
seed: 0
model:
  from: $model
tokenizer: $model
data:
  train:
    - source: {path: $mnli}
      template: mnli
  eval: []
  seq_len: $seq
  mode: pack
  loss_on: all
memory:
  activation_checkpointing: $lora
$( [ "$lora" = true ] && printf 'lora:\n  r: 8\n  alpha: 16\n  dropout: 0.05\n  target_modules: [q_proj, v_proj]\n' )
optimizer:
  lr: 1.0e-4
  betas: [0.9, 0.999]
  eps: 1.0e-8
  weight_decay: 0.0
  grad_clip: 1.0
schedule:
  kind: constant
  warmup: 0
precision:
  compute: $dtype
batch:
  global: $micro
  micro: $micro
steps: $steps
device: $device
checkpoint:
  every: 0
  keep_last: 1
  dir: $work/checkpoints
eval:
  every: 0
  task: loss
tracking:
  log_dir: $work/runs
  log_every: 1
YAML
  echo "$work/$name.yaml"
}

# kiln_train PART NAME MODEL DTYPE MICRO SEQ STEPS LORA LIMIT [KILL_AFTER_STEPS]
kiln_train() {
  local part=$1 name=$2 model=$3 dtype=$4 micro=$5 seq=$6 steps=$7 lora=$8 limit=$9
  local kill_after=${10:-0} file peak ok=0
  file=$(recipe "$name" "$model" "$dtype" "$micro" "$seq" "$steps" "$lora")
  memory_start
  if [ "$kill_after" -gt 0 ]; then
    # The 6B full fine-tune's final checkpoint (weights and fp32 AdamW states, ~100 GB) would
    # not fit the disk: the run is stopped with SIGKILL once its timed steps are logged.
    run "$part" "$name" "$limit" "$python" "$ref" run-steps --metrics "$work/runs/$name/metrics.jsonl" \
      --steps "$kill_after" -- "$kiln" train "$file" --quiet && ok=1
  else
    run "$part" "$name" "$limit" "$kiln" train "$file" --quiet && ok=1
  fi
  peak=$(memory_stop)
  if [ $ok = 1 ]; then
    local detail
    detail=$("$python" "$ref" kiln-detail --run "$work/runs/$name" --model "$model" --seq "$seq" \
      --dtype "$dtype" $( [ "$lora" = true ] && echo --lora ) --peak-mib "$peak" \
      --gpu-memory-mib "$gpu_memory_mib" 2>> "$out/$name.log") \
      || { record "$part" "$name" "failed: its results could not be read (see $name.log)" "$last_seconds"; return; }
    record "$part" "$name" pass "$last_seconds" "$detail"
  fi
}

# torch_train PART NAME MODEL DTYPE MICRO SEQ STEPS LORA LIMIT
torch_train() {
  local part=$1 name=$2 model=$3 dtype=$4 micro=$5 seq=$6 steps=$7 lora=$8 limit=$9
  local flags=()
  [ "$lora" = true ] && flags=(--lora --checkpointing)
  if run "$part" "$name" "$limit" "$python" "$ref" train --model "$model" --dtype "$dtype" \
    --batch "$micro" --seq "$seq" --steps "$steps" "${flags[@]}"; then
    local detail
    detail=$("$python" "$ref" torch-detail --result "$out/$name.log" --model "$model" --seq "$seq" \
      --dtype "$dtype" $( [ "$lora" = true ] && echo --lora ) 2>> "$out/$name.err") \
      || { record "$part" "$name" "failed: its results could not be read (see $name.err)" "$last_seconds"; return; }
    record "$part" "$name" pass "$last_seconds" "$detail"
  fi
}

small="$work/models/small"
if run small init-small 60 "$kiln" init --preset small --out "$small" --tokenizer "$tokenizer"; then
  kiln_train small kiln-small-fp32 "$small" fp32 "$small_batch" 256 "$small_steps" false 90
  torch_train small torch-small-fp32 "$small" fp32 "$small_batch" 256 "$small_steps" false 90
  kiln_train small kiln-small-bf16 "$small" bf16 "$small_batch" 256 "$small_steps" false 90
  torch_train small torch-small-bf16 "$small" bf16 "$small_batch" 256 "$small_steps" false 90
fi

big="$work/models/gptj-6b"
if run 6b-lora init-6b 240 "$kiln" init --preset "$big_preset" --dtype bf16 --out "$big" --tokenizer "$tokenizer"; then
  record 6b-lora init-6b pass "$last_seconds"
  kiln_train 6b-lora kiln-6b-lora-1x1024 "$big" bf16 1 1024 4 true 150
  torch_train 6b-lora torch-6b-lora-1x1024 "$big" bf16 1 1024 4 true 150
  kiln_train 6b-lora kiln-6b-lora-8x1024 "$big" bf16 8 1024 3 true 150
  torch_train 6b-lora torch-6b-lora-8x1024 "$big" bf16 8 1024 3 true 150
fi

# --- generation and evaluation ----------------------------------------------------------------
if [ -d "$small" ]; then
  if run generate kiln-generate 90 "$kiln" bench --model "$small" --device "$device" --input-lengths 32 \
    --output-lengths 64 --batch-sizes 1,16 --repeats 3 --warmup --json "$out/kiln-generate.json"; then
    record generate kiln-generate pass "$last_seconds" "$("$python" "$ref" bench-detail --json "$out/kiln-generate.json")"
  fi
  for batch in 1 16; do
    if run generate "hf-generate-b$batch" 90 "$python" "$ref" generate --model "$small" --batch "$batch" \
      --input-len 32 --new-tokens 64; then
      record generate "hf-generate-b$batch" pass "$last_seconds" \
        "$("$python" "$ref" json-line --log "$out/hf-generate-b$batch.log" || echo null)"
    fi
  done
  if [ -f "$mnli" ]; then
    if run eval "kiln-eval-mnli-$eval_rows" 120 "$kiln" eval --model "$small" --task mnli --data "$mnli" \
      --limit "$eval_rows" --batch-size 64 --device "$device" --report "$out/eval-report"; then
      record eval "kiln-eval-mnli-$eval_rows" pass "$last_seconds" \
        "{\"rows\": $eval_rows, \"rows_per_sec\": $("$python" -c "print(round($eval_rows / $last_seconds, 1))")}"
    fi
  else
    record eval "kiln-eval-mnli-$eval_rows" "not run (the bundle carries no MNLI rows)" 0
  fi
fi

# --- NCCL: a 1-rank torchrun-style job ---------------------------------------------------------
# One rank's all-reduce is the identity, so its losses must equal a plain single-process run's
# of the same recipe, step for step.
if [ -d "$small" ]; then
  nccl_recipe=$(recipe nccl-1-rank "$small" bf16 8 256 5 false)
  plain_recipe=$(recipe nccl-plain "$small" bf16 8 256 5 false)
  # NCCL_DEBUG=INFO: NCCL's own lines in the log show that its communicator was set up.
  if run nccl nccl-1-rank 90 env NCCL_DEBUG=INFO RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 \
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29517 "$kiln" train "$nccl_recipe" \
    && run nccl nccl-plain 90 "$kiln" train "$plain_recipe" --quiet; then
    version=$(grep -o -m1 "NCCL version [^ ]*" "$out/nccl-1-rank.log" | tr -d '"\\')
    if ! grep -q "NCCL INFO" "$out/nccl-1-rank.log"; then
      record nccl nccl-1-rank "failed: no NCCL communicator was set up (no NCCL INFO lines)" "$last_seconds"
    elif comparison=$("$python" "$ref" same-losses "$work/runs/nccl-1-rank/metrics.jsonl" \
      "$work/runs/nccl-plain/metrics.jsonl"); then
      record nccl nccl-1-rank pass "$last_seconds" "{\"nccl\": \"$version\", \"losses\": $comparison}"
    else
      record nccl nccl-1-rank "failed: its losses differ from the single-process run's: $(echo "$comparison" | tr -d '"\\' | cut -c1-200)" "$last_seconds"
    fi
  fi
fi

# --- one full fine-tune step of the 6B shape --------------------------------------------------
if [ -d "$big" ]; then
  kiln_train 6b-full kiln-6b-full-1x1024 "$big" bf16 1 1024 4 false 200 3
  torch_train 6b-full torch-6b-full-1x1024 "$big" bf16 1 1024 3 false 200
fi

"$python" "$ref" summarize --results "$results" --out "$out"
echo "gpu-check: $(( $(date +%s) - started )) s; summary: $out/summary.md"
[ "${KILN_GPU_CHECK_KEEP:-0}" = 1 ] || rm -rf "$work"
