#!/usr/bin/env python3
"""PyTorch eager reference for Kiln's training-throughput benchmark.

Trains a randomly initialised HF GPT-J (the `small` preset) on random tokens
and prints one JSON line:
    {"impl": "pytorch", "dtype": ..., "tokens_per_sec": ..., "peak_rss_mb": ...}

    python scripts/bench_train_ref.py --dtype fp32 --warmup 2 --steps 5
    python scripts/bench_train_ref.py --dtype bf16 --warmup 2 --steps 5
"""

import argparse
import json
import resource
import sys
import time

import torch
from transformers import GPTJConfig, GPTJForCausalLM

# Mirrors the `small` preset on the Rust side; keep the two in sync.
SMALL = dict(
    n_layer=4,
    n_embd=256,
    n_head=8,
    rotary_dim=16,
    vocab_size=50400,
    n_positions=2048,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux but bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernel selection)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16 = CPU autocast around forward+loss, fp32 master weights and optimizer state")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = GPTJConfig(**SMALL, attn_implementation="eager")
    model = GPTJForCausalLM(config).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # Batches are drawn up front so token generation is not timed.
    total = args.warmup + args.steps
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = torch.randint(0, SMALL["vocab_size"], (total, args.batch, args.seq), generator=gen)

    def step(ids: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.item()  # .item() also forces completion before the clock is read

    for i in range(args.warmup):
        step(batches[i])
    t0 = time.perf_counter()
    last_loss = float("nan")
    for i in range(args.warmup, total):
        last_loss = step(batches[i])
    elapsed = time.perf_counter() - t0

    print(json.dumps({
        "impl": "pytorch",
        "dtype": args.dtype,
        "tokens_per_sec": round(args.steps * args.batch * args.seq / elapsed, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "sec_per_step": round(elapsed / args.steps, 4),
        "last_loss": round(last_loss, 6),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
