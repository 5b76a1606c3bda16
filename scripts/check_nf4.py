#!/usr/bin/env python3
"""bitsandbytes' NF4 of a tensor, for comparing with Kiln's (`src/ops/quant.rs`).

    python3 scripts/check_nf4.py IN.safetensors OUT.safetensors

Reads tensor `w` (fp32), quantises it with `bitsandbytes.functional.quantize_4bit(w,
blocksize=64, quant_type="nf4")` on the CPU without and with double quantisation, and writes
the packed codes, the absmax (and for double quantisation its 8-bit codes, their absmax and the
offset) and `dequantize_4bit` of each, in fp32 and in bf16.
"""

import sys

import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file


def main():
    w = load_file(sys.argv[1])["w"]
    out = {}
    for name, double in [("plain", False), ("double", True)]:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
        out[f"{name}.packed"] = packed.reshape(-1).contiguous()
        out[f"{name}.dequantized"] = F.dequantize_4bit(packed, state).contiguous()
        if double:
            out[f"{name}.absmax_codes"] = state.absmax.contiguous()
            out[f"{name}.absmax2"] = state.state2.absmax.contiguous()
            out[f"{name}.offset"] = state.offset.reshape(1).float()
            out[f"{name}.code2"] = state.state2.code.contiguous()
        else:
            out[f"{name}.absmax"] = state.absmax.contiguous()
        wb = w.to(torch.bfloat16)
        packed_b, state_b = F.quantize_4bit(wb, blocksize=64, quant_type="nf4", compress_statistics=double)
        out[f"{name}.bf16"] = F.dequantize_4bit(packed_b, state_b).contiguous()
    save_file(out, sys.argv[2])


if __name__ == "__main__":
    main()
