#!/usr/bin/env python3
"""Reference side of the `lora:` cross-checks: Hugging Face PEFT on a base model.

Base models are Hugging Face model directories (config.json + model.safetensors);
adapters are PEFT directories (adapter_config.json + adapter_model.safetensors).
Token ids are given as rows separated by ';', ids within a row by ',', all rows
the same length, e.g. --ids "1,2,3;4,5,6" is a batch of 2 sequences of 3 tokens.

    python scripts/check_peft.py logits --base DIR --adapter DIR --ids IDS --out FILE
        Runs the base model with the adapter (eval mode, no grad) and writes
        `logits` [batch, seq, vocab].

    python scripts/check_peft.py make-adapter --base DIR --out DIR --r R --alpha A \
        --targets q_proj,v_proj [--dropout P] [--seed S]
        Writes a fresh PEFT LoRA adapter for DIR with save_pretrained. lora_B is
        drawn from normal(0, 0.05) instead of PEFT's zeros, so the adapter
        actually changes the output.

    python scripts/check_peft.py grads --base DIR --adapter DIR --ids IDS --out FILE
        One training-mode forward/backward with every dropout off, loss as
        transformers computes it (`labels=ids`: mean cross-entropy over the
        shifted tokens). Writes `loss` [1] and the gradient of every LoRA
        parameter under the key PEFT uses for it in adapter_model.safetensors,
        e.g. `base_model.model.transformer.h.0.attn.q_proj.lora_A.weight`.

Output files are safetensors, float32, written with safetensors.torch.save_file.
Everything runs on CPU. Errors go to stderr with exit status 2.
"""

import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

# Same as make_fixtures.py: a fixed thread count keeps reduction order (the
# last bits of the reference numbers) the same on machines with more cores.
torch.set_num_threads(2)
# The callers show stderr when a check fails; per-load progress bars would bury
# the message that matters.
hf_logging.disable_progress_bar()

# Std of the random lora_B: large enough that the adapter visibly moves the
# logits of a tiny random model, small enough to stay far from saturation.
LORA_B_STD = 0.05


class Failure(Exception):
    """A problem with the caller's input: reported as one line, no traceback."""


def parse_ids(text: str) -> torch.Tensor:
    rows = [row.strip() for row in text.split(";")]
    if not rows or any(not row for row in rows):
        raise Failure(f"--ids {text!r}: empty row (rows are separated by ';', ids by ',')")
    parsed = []
    for i, row in enumerate(rows):
        try:
            parsed.append([int(tok) for tok in row.split(",")])
        except ValueError:
            raise Failure(f"--ids: row {i} ({row!r}) is not a comma-separated list of integers") from None
    lengths = {len(row) for row in parsed}
    if len(lengths) != 1:
        # Ragged rows would need padding and an attention mask, which would make
        # the reference depend on how the padding is masked.
        raise Failure(f"--ids: rows have different lengths {sorted(lengths)}; all rows must be the same length")
    return torch.tensor(parsed, dtype=torch.long)


def check_dir(path: Path, what: str, files: list) -> None:
    if not path.is_dir():
        raise Failure(f"{what} {path}: not a directory")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise Failure(f"{what} {path}: missing {', '.join(missing)}")


def load_base(base: Path, no_dropout: bool = False):
    check_dir(base, "--base", ["config.json"])
    config = AutoConfig.from_pretrained(base)
    if no_dropout:
        # Setting nn.Dropout modules to p=0 is not enough: GPT-J, GPT-Neo and
        # GPT-NeoX pass the attention dropout to the attention kernel as a
        # plain float read from the config (GPT-NeoX copies it at init), so the
        # config must say 0 before the model is built.
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    # `dtype`, not the `torch_dtype` transformers 5 warns about: same meaning.
    # float32 explicitly, since a config.json may name another dtype.
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    return model.eval()


def check_ids(ids: torch.Tensor, model) -> None:
    # An out-of-range id fails deep inside an embedding lookup with an
    # unhelpful IndexError; say which bound it broke instead.
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise Failure(f"--ids: token ids must be in [0, {vocab}) for this model, got {ids.min()}..{ids.max()}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and ids.shape[1] > max_pos:
        raise Failure(f"--ids: {ids.shape[1]} tokens per row, the model takes at most {max_pos}")


def adapter_keys(adapter: Path) -> set:
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        return set(f.keys())


def write(tensors: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(out))


def cmd_logits(args) -> None:
    check_dir(args.adapter, "--adapter", ["adapter_config.json", "adapter_model.safetensors"])
    ids = parse_ids(args.ids)
    base = load_base(args.base)
    check_ids(ids, base)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    write({"logits": logits}, args.out)


def cmd_make_adapter(args) -> None:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        raise Failure("--targets: give at least one module name, e.g. q_proj,v_proj")
    if args.r < 1:
        raise Failure(f"--r must be at least 1, got {args.r}")
    if not 0.0 <= args.dropout < 1.0:
        raise Failure(f"--dropout must be in [0, 1), got {args.dropout}")
    base = load_base(args.base)
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    unknown = [t for t in targets if t not in names]
    if unknown:
        # PEFT's own message for this lists every module of the model; this
        # one names just the bad target.
        raise Failure(f"--targets: no module named {', '.join(unknown)} in {args.base}")
    config = LoraConfig(
        r=args.r,
        # PEFT declares lora_alpha an int and adapters in the wild say "16",
        # not "16.0"; keep that form unless a fractional alpha was asked for.
        lora_alpha=int(args.alpha) if args.alpha.is_integer() else args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # Seed before get_peft_model too: lora_A's kaiming init draws from the
    # global generator, and the same --seed must give the same adapter.
    torch.manual_seed(args.seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, LORA_B_STD)
    model.save_pretrained(args.out)


def cmd_grads(args) -> None:
    check_dir(args.adapter, "--adapter", ["adapter_config.json", "adapter_model.safetensors"])
    ids = parse_ids(args.ids)
    base = load_base(args.base, no_dropout=True)
    check_ids(ids, base)
    model = PeftModel.from_pretrained(base, args.adapter, is_trainable=True)
    # Training mode is what Kiln's step runs in, but the reference must be
    # deterministic: the adapter's lora_dropout (if any) and the model's
    # dropout modules are switched off here, the config-driven ones in load_base.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()

    # A dropout this script missed would make the gradients random; the
    # eval-mode loss must then differ, so compare before trusting the backward.
    model.eval()
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=ids).loss
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    if not torch.allclose(loss.detach(), eval_loss, rtol=1e-5, atol=1e-6):
        raise Failure(f"training-mode loss {loss.item()} != eval-mode loss {eval_loss.item()}: some dropout is still on")
    loss.backward()

    grads = {}
    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        if param.grad is None:
            raise Failure(f"{name} got no gradient (is it on the path from the input to the loss?)")
        grads[name] = param.grad
    # Let PEFT name the tensors: get_peft_model_state_dict is the very mapping
    # save_pretrained applies (drops the adapter name), so the keys match the
    # adapter file by construction; the comparison below catches any drift.
    named = get_peft_model_state_dict(model, state_dict=grads)
    expected = adapter_keys(args.adapter)
    if set(named) != expected:
        raise Failure(
            "gradient names do not match the adapter's tensors: "
            f"only in grads {sorted(set(named) - expected)}, only in adapter {sorted(expected - set(named))}"
        )
    named["loss"] = loss.detach().reshape(1)
    write(named, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logits", help="logits of the base model with a PEFT adapter")
    p.add_argument("--base", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    p.add_argument("--ids", required=True, help='token ids, e.g. "1,2,3;4,5,6"')
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.set_defaults(run=cmd_logits)

    p = sub.add_parser("make-adapter", help="a random PEFT LoRA adapter for a base model")
    p.add_argument("--base", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    p.add_argument("--r", type=int, required=True, help="LoRA rank")
    p.add_argument("--alpha", type=float, required=True, help="lora_alpha (scale is alpha / r)")
    p.add_argument("--targets", required=True, help="comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for lora_A and lora_B (default 0)")
    p.set_defaults(run=cmd_make_adapter)

    p = sub.add_parser("grads", help="loss and LoRA gradients of one training step")
    p.add_argument("--base", type=Path, required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    p.add_argument("--ids", required=True, help='token ids, e.g. "1,2,3;4,5,6" (also the labels)')
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    p.set_defaults(run=cmd_grads)

    args = parser.parse_args()
    try:
        args.run(args)
    except Failure as e:
        print(f"check_peft.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
