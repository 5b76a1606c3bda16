#!/usr/bin/env bash
# Regenerates tests/fixtures/lora: for each family's parity model, a PEFT LoRA adapter (B drawn
# non-zero so that it changes the output), PEFT's logits with it, and PEFT's gradients of the
# adapter for HF's causal-LM loss on the same ids. Run from the repository root with the Python
# of scripts/requirements.txt:  scripts/make_lora_fixtures.sh .venv/bin/python
set -euo pipefail
python="${1:-python3}"
ids="3,17,42,99,5,8,60,1;7,7,2,50,31,12,90,4"
out=tests/fixtures/lora
make() {  # family base targets
  local dir="$out/$1"
  rm -rf "$dir" && mkdir -p "$dir"
  "$python" scripts/check_peft.py make-adapter --base "tests/fixtures/parity/$2" --out "$dir/adapter" \
    --r 4 --alpha 6 --targets "$3" --seed 7
  # PEFT's model card is not part of the adapter.
  rm -f "$dir/adapter/README.md"
  "$python" scripts/check_peft.py logits --base "tests/fixtures/parity/$2" --adapter "$dir/adapter" \
    --ids "$ids" --out "$dir/logits.safetensors"
  "$python" scripts/check_peft.py grads --base "tests/fixtures/parity/$2" --adapter "$dir/adapter" \
    --ids "$ids" --out "$dir/grads.safetensors"
  echo "$ids" > "$dir/ids.txt"
}
make gptj rot8 q_proj,v_proj,fc_in
make gpt2 gpt2 c_attn,c_fc
make neo neo q_proj,v_proj,out_proj
make neox neox query_key_value,dense_4h_to_h
