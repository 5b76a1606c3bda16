#!/usr/bin/env python3
"""QLoRA with PEFT + bitsandbytes, for comparing with Kiln's (`tests/quant.rs`).

    python3 scripts/check_qlora.py score BASE IDS.jsonl OUT.jsonl [--adapter DIR] [--quantize nf4|int8] [--double-quant] [--bnb-forward]
    python3 scripts/check_qlora.py train BASE IDS.jsonl ADAPTER_OUT [--double-quant]

`score` writes, for each line {"ids": [...]} of IDS.jsonl, {"logprobs": [...]}: the
log-probability of each token after the first given the ones before it, as `kiln score` does,
from BASE in fp32 — quantised by bitsandbytes (`BitsAndBytesConfig`, fp32 compute) when asked —
with a PEFT adapter on top when given. Quantised, the model computes with bitsandbytes'
dequantised weights in fp32 (`model.dequantize()`): bitsandbytes' own CPU 4-bit product
differs from that fp32 product by up to about 4e-3 on a tiny model's layers (it does not
accumulate in fp32), so `--bnb-forward` asks for it separately. `train` fine-tunes a LoRA adapter (r 4 on q_proj and
v_proj) on BASE quantised to NF4, three AdamW steps on the ids, and saves it with PEFT's
`save_pretrained`: a QLoRA adapter as PEFT users make them.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def flag(name):
    return name in sys.argv


def option(name, default=None):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def load(base, quantize):
    if quantize is None:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if quantize == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=flag("--double-quant"),
        )
    return AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def rows(path):
    with open(path) as f:
        return [json.loads(line)["ids"] for line in f if line.strip()]


def score(base, ids_path, out_path):
    quantize = option("--quantize")
    model = load(base, quantize)
    if quantize and not flag("--bnb-forward"):
        model = model.dequantize()
    adapter = option("--adapter")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with open(out_path, "w") as out, torch.no_grad():
        for ids in rows(ids_path):
            x = torch.tensor([ids])
            logits = model(x).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, x[0, 1:, None])[:, 0]
            out.write(json.dumps({"logprobs": logprobs.tolist()}) + "\n")


def train(base, ids_path, adapter_out):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load(base, "nf4")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.tensor(rows(ids_path))
    for _ in range(3):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_out)


def main():
    mode, base, ids_path, out = sys.argv[1:5]
    {"score": score, "train": train}[mode](base, ids_path, out)


if __name__ == "__main__":
    main()
