"""PyTorch + Hugging Face (+ PEFT) on the same shapes as Kiln's GPU check, for the side-by-side
numbers in its summary. Run by `gpu-check` with the node's own Python; prints one JSON object.

    gpu_ref.py versions
    gpu_ref.py train --model DIR --dtype fp32|bf16 --batch B --seq S --steps N [--lora] [--checkpointing]
    gpu_ref.py generate --model DIR --batch B --input-len N --new-tokens M
    gpu_ref.py flops --model DIR --seq S [--lora]      # training FLOPs per token, for MFU

and the check's own bookkeeping (reading Kiln's logs, writing summary.md): run-steps,
kiln-detail, torch-detail, bench-detail, parity-detail, summarize.

The training setup mirrors Kiln's: fp32 master weights with bf16 autocast for `bf16`, a frozen
bf16 base with fp32 LoRA adapters (r 8, alpha 16, q_proj and v_proj, PEFT's GPT-J default) for
`--lora`, AdamW (fused, as the HF Trainer's default), gradient checkpointing where Kiln
checkpoints activations. Tokens are random: throughput does not depend on their values.
"""

import argparse
import json
import statistics
import sys
import time


def versions():
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def load(model_dir, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device())


def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train(args):
    import torch

    torch.manual_seed(0)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = load(args.model, torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model = load(args.model, torch.float32)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.lora:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=fused)
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 50257), (args.batch, args.seq), device=device())
    autocast = torch.autocast(device_type=device(), dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16" or args.lora)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        seconds.append(time.perf_counter() - start)
    timed = seconds[2:] or seconds[1:] or seconds
    step = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"tokens_per_sec": args.batch * args.seq / step, "step_seconds": step,
            "steps": args.steps, "peak_memory_mib": peak, "loss": loss.item(),
            "trained_parameters": sum(p.numel() for p in params)}


def generate(args):
    import torch

    model = load(args.model, torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, min(vocab, 50257), (args.batch, args.input_len), device=device())
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up: kernels, caches
        runs = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            sync()
            runs.append(time.perf_counter() - start)
    total = statistics.median(runs)
    return {"new_tokens_per_sec": args.batch * args.new_tokens / total, "seconds": total}


def flops(args):
    """Training FLOPs per token (PaLM's accounting, without the recomputation that activation
    checkpointing adds): 6 per weight of every matrix product for a full fine-tune, 4 for LoRA's
    frozen base (no weight gradients), plus attention's 12 · layers · d_model · seq."""
    config = json.load(open(f"{args.model}/config.json"))
    layers = config.get("n_layer") or config.get("num_hidden_layers")
    d = config.get("n_embd") or config.get("hidden_size")
    inner = config.get("n_inner") or config.get("intermediate_size") or 4 * d
    vocab = config["vocab_size"]
    matmul = layers * (4 * d * d + 2 * d * inner) + d * vocab
    per_weight = 4 if args.lora else 6
    return {"flops_per_token": per_weight * matmul + 12 * layers * d * args.seq,
            "matmul_parameters": matmul}


def run_steps(args):
    """Runs a command until its metrics.jsonl holds `--steps` train/loss rows, then kills it."""
    import os
    import signal
    import subprocess

    child = subprocess.Popen(args.argv)
    while child.poll() is None:
        if len(train_rows(args.metrics, "train/loss")) >= args.steps:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            return {"stopped_after_steps": args.steps}
        time.sleep(0.5)
    if child.returncode != 0:
        sys.exit(child.returncode)
    return {"exited": 0}


def train_rows(metrics, tag):
    try:
        rows = [json.loads(line) for line in open(metrics) if line.strip()]
    except FileNotFoundError:
        return []
    return [r["value"] for r in rows if r.get("tag") == tag]


def same_losses(args):
    """Exits non-zero unless two runs logged the same train/loss at every step (relative 1e-6:
    one rank's all-reduce is the identity, so only a different summation order may show)."""
    a, b = (train_rows(path, "train/loss") for path in (args.a, args.b))
    worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=None)
    result = {"steps": len(a), "max_relative_difference": worst, "last": a[-1] if a else None}
    if not a or len(a) != len(b) or worst > 1e-6:
        print(json.dumps({"first": a, "second": b, "max_relative_difference": worst}))
        sys.exit(1)
    return result


def timed(values):
    """The steady state: the first steps compile kernels and fill the allocator's pool."""
    skip = 2 if len(values) > 4 else 1
    return values[skip:] or values


def kiln_detail(args):
    run = args.run
    tokens_per_sec = statistics.median(timed(train_rows(f"{run}/metrics.jsonl", "train/tokens_per_sec")))
    info = json.load(open(f"{run}/run.json"))
    estimate = ((info.get("memory") or {}).get("estimate") or {})
    key = "total_checkpointed" if args.lora else "total"
    out = {"tokens_per_sec": tokens_per_sec, "peak_memory_mib": float(args.peak_mib),
           "estimate_mib": estimate[key] / 2**20 if key in estimate else None,
           "gpu_memory_mib": float(args.gpu_memory_mib),
           "dtype": args.dtype, "seq": args.seq, "lora": args.lora}
    out.update(flops(args))
    return out


def last_json(path):
    """The last line of a log that is a JSON object: this script's answer, whatever the libraries
    printed around it."""
    for line in reversed(open(path).read().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise SystemExit(f"{path}: no JSON result")


def torch_detail(args):
    result = last_json(args.result)
    result.update({"dtype": args.dtype, "seq": args.seq, "lora": args.lora})
    result.update(flops(args))
    return result


def bench_detail(args):
    """New tokens/s per batch size from `kiln bench --json`."""
    data = json.load(open(args.json))
    rows = data.get("results") or data.get("rows") or []
    out = {}
    for row in rows:
        batch = row.get("batch_size") or row.get("batch")
        rate = row.get("tokens_per_s")
        if batch is not None and rate is not None:
            out[f"batch_{batch}_new_tokens_per_sec"] = rate
    return out or {"raw": data}


def parity_detail(args):
    lines = open(args.log).read().splitlines()
    return {"tests": [l for l in lines if l.startswith("test ") and (" ok" in l or "FAILED" in l)],
            "differences": [l.strip() for l in lines if "max abs diff" in l or "worst" in l][:40],
            "result": next((l for l in lines if l.startswith("test result")), None)}


# Dense peak FLOP/s per GPU (NVIDIA's datasheets; no sparsity): bf16 on the tensor cores, and
# plain fp32 (neither Kiln nor PyTorch uses TF32 for fp32 products by default).
PEAKS = [("H200", 989.4e12, 66.9e12), ("H100 PCIe", 756.5e12, 51.2e12), ("H100", 989.4e12, 66.9e12),
         ("A100", 312e12, 19.5e12), ("L40S", 362e12, 91.6e12), ("A10", 125e12, 31.2e12)]


def peak_flops(gpu, dtype):
    for name, bf16, fp32 in PEAKS:
        if name in (gpu or ""):
            return bf16 if dtype == "bf16" else fp32
    return None


def summarize(args):
    import os

    machine = {}
    try:
        machine = json.load(open(f"{args.out}/machine.json"))
    except (OSError, ValueError):
        pass
    records = [json.loads(l) for l in open(args.results) if l.strip()]
    gpu = machine.get("gpu")
    lines = ["# Kiln GPU check", ""]
    py = machine.get("python") or {}
    lines.append(f"- GPU: {gpu}, {machine.get('memory_mib')} MiB, compute capability "
                 f"{machine.get('compute_capability')}, driver {machine.get('driver')}")
    lines.append(f"- PyTorch side: torch {py.get('torch')} (CUDA {py.get('cuda')}), transformers "
                 f"{py.get('transformers')}, peft {py.get('peft')}")
    build = (machine.get("bundle") or "").strip().replace("\n", "; ")
    lines.append(f"- bundle: {build}")
    libs = (machine.get("libraries") or "").strip().splitlines()
    lines += [f"- {l}" for l in libs]
    lines += ["", "## Parts", "", "| part | run | result | seconds |", "| --- | --- | --- | --- |"]
    for r in records:
        lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {r['seconds']} |")

    def mfu(d):
        peak = peak_flops(gpu, d.get("dtype"))
        if peak is None or "tokens_per_sec" not in d:
            return None
        return d["tokens_per_sec"] * d["flops_per_token"] / peak

    by_name = {r["name"]: r for r in records if r["status"] == "pass"}
    lines += ["", "## Training, side by side", "",
              "| shape | Kiln tokens/s | Kiln MFU | PyTorch tokens/s | PyTorch MFU | Kiln / PyTorch "
              "| Kiln peak MiB | Kiln estimate MiB | PyTorch peak MiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name, r in by_name.items():
        if not name.startswith("kiln-") or r["part"] not in ("small", "6b-lora", "6b-full"):
            continue
        shape = name[len("kiln-"):]
        k = r["detail"]
        if not isinstance(k, dict) or "tokens_per_sec" not in k:
            continue
        t = (by_name.get("torch-" + shape) or {}).get("detail") or {}
        ratio = k["tokens_per_sec"] / t["tokens_per_sec"] if t.get("tokens_per_sec") else None
        lines.append(f"| {shape} | {k['tokens_per_sec']:.0f} | {fmt(mfu(k), '.1%')} | "
                     f"{fmt(t.get('tokens_per_sec'), '.0f')} | {fmt(mfu(t) if t else None, '.1%')} | "
                     f"{fmt(ratio, '.2f')} | {fmt(k.get('peak_memory_mib'), '.0f')} | "
                     f"{fmt(k.get('estimate_mib'), '.0f')} | {fmt(t.get('peak_memory_mib'), '.0f')} |")
    lines += ["", "MFU counts 6 FLOPs per weight and token for a full fine-tune, 4 for LoRA's frozen "
              "base, plus attention (PaLM's accounting, recomputation not counted). Kiln's peak is "
              "nvidia-smi's (the device's memory in use above what it was before the run); "
              "PyTorch's is torch.cuda.max_memory_allocated.", ""]
    kg = (by_name.get("kiln-generate") or {}).get("detail") or {}
    lines += ["## Generation (greedy, 32 prompt tokens, 64 new)", "",
              "| batch | Kiln new tokens/s | HF generate new tokens/s | Kiln / HF |", "| --- | --- | --- | --- |"]
    for batch in (1, 16):
        k = kg.get(f"batch_{batch}_new_tokens_per_sec")
        h = ((by_name.get(f"hf-generate-b{batch}") or {}).get("detail") or {}).get("new_tokens_per_sec")
        lines.append(f"| {batch} | {fmt(k, '.0f')} | {fmt(h, '.0f')} | "
                     f"{fmt(k / h if k and h else None, '.2f')} |")
    lines.append("")
    lines += ["## Details", ""]
    for r in records:
        if r.get("detail") is not None:
            lines.append(f"- {r['name']}: `{json.dumps(r['detail'])}`")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    return {"summary": os.path.join(args.out, "summary.md"), "parts": len(records),
            "failed": [r["name"] for r in records if r["status"] != "pass"]}


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--dtype", choices=["fp32", "bf16"], required=True)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--seq", type=int, required=True)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--lora", action="store_true")
    t.add_argument("--checkpointing", action="store_true")
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--batch", type=int, required=True)
    g.add_argument("--input-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    f = sub.add_parser("flops")
    f.add_argument("--model", required=True)
    f.add_argument("--seq", type=int, required=True)
    f.add_argument("--lora", action="store_true")
    r = sub.add_parser("run-steps")
    r.add_argument("--metrics", required=True)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("argv", nargs="+")
    for name in ("kiln-detail", "torch-detail"):
        d = sub.add_parser(name)
        d.add_argument("--run")
        d.add_argument("--result")
        d.add_argument("--model", required=True)
        d.add_argument("--seq", type=int, required=True)
        d.add_argument("--dtype", required=True)
        d.add_argument("--lora", action="store_true")
        d.add_argument("--peak-mib", default="nan")
        d.add_argument("--gpu-memory-mib", default="nan")
    sub.add_parser("bench-detail").add_argument("--json", required=True)
    sub.add_parser("parity-detail").add_argument("--log", required=True)
    sub.add_parser("json-line").add_argument("--log", required=True)
    same = sub.add_parser("same-losses")
    same.add_argument("a")
    same.add_argument("b")
    m = sub.add_parser("summarize")
    m.add_argument("--results", required=True)
    m.add_argument("--out", required=True)
    args = parser.parse_args()
    commands = {"versions": versions, "train": train, "generate": generate, "flops": flops,
                "run-steps": run_steps, "kiln-detail": kiln_detail, "torch-detail": torch_detail,
                "bench-detail": bench_detail, "parity-detail": parity_detail,
                "json-line": lambda a: last_json(a.log), "same-losses": same_losses,
                "summarize": summarize}
    result = commands[args.command](*([] if args.command == "versions" else [args]))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
