#!/usr/bin/env python3
"""transformers `generate` reference for Kiln's generation-throughput benchmark.

Greedy decoding with a randomly initialised HF GPT-J (`small` preset) from
random prompts; every row is forced to produce exactly --max-new-tokens.
Prints one JSON line:
    {"impl": "transformers", "batch": ..., "new_tokens_per_sec": ...}

    python scripts/bench_generate_ref.py --batch 1
    python scripts/bench_generate_ref.py --batch 16
"""

import argparse
import json
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
    # No eos/bos: with a random model, an accidental eos would end a row early
    # and make the token count (and the comparison with Kiln) meaningless.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed generate calls first")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls; the rate is over all of them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = GPTJConfig(**SMALL, attn_implementation="eager")
    model = GPTJForCausalLM(config).float().eval()
    # generation_config is derived from the model config at construction;
    # clear eos there too so no default stopping criterion is installed.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, SMALL["vocab_size"], (args.batch, args.prompt_len), generator=gen)
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,
        use_cache=True,
    )

    with torch.inference_mode():
        for _ in range(args.warmup):
            model.generate(prompt, **kwargs)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = model.generate(prompt, **kwargs)
        elapsed = time.perf_counter() - t0

    new_per_call = out.shape[1] - args.prompt_len
    assert new_per_call == args.max_new_tokens, f"generated {new_per_call}, expected {args.max_new_tokens}"
    new_tokens = args.repeats * args.batch * new_per_call

    print(json.dumps({
        "impl": "transformers",
        "batch": args.batch,
        "new_tokens_per_sec": round(new_tokens / elapsed, 2),
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "sec_per_call": round(elapsed / args.repeats, 4),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
