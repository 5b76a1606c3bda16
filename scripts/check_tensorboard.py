#!/usr/bin/env python3
"""Dump a TensorBoard event directory as JSON, the way TensorBoard itself reads it.

    python scripts/check_tensorboard.py LOGDIR

Prints to stdout:
    {"scalars": {tag: [[step, value], ...]}, "text": {tag: [str, ...]}}

Only event files directly inside LOGDIR are read (TensorBoard treats each
directory as one run). Values come out in file order. Non-finite scalar
values are written as null so the output stays strict JSON (serde_json
rejects NaN). Text tags are reported exactly as stored, e.g. torch's
SummaryWriter.add_text("notes", ...) is stored under "notes/text_summary".
Exits with status 2 and a message on stderr if LOGDIR has no event file.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

# 0 = keep every event; the default guidance samples scalars and keeps only
# the last 10 tensors, which would hide logging bugs.
KEEP_ALL = {
    ea.COMPRESSED_HISTOGRAMS: 0,
    ea.IMAGES: 0,
    ea.AUDIO: 0,
    ea.SCALARS: 0,
    ea.HISTOGRAMS: 0,
    ea.TENSORS: 0,
}


def finite_or_none(x: float):
    return x if math.isfinite(x) else None


def event_files(logdir: Path) -> list:
    return sorted(p for p in logdir.iterdir() if p.is_file() and "tfevents" in p.name)


def plugin_of(acc: ea.EventAccumulator, tag: str) -> str:
    try:
        return acc.SummaryMetadata(tag).plugin_data.plugin_name
    except KeyError:
        return ""


def decode_text(tensor_proto) -> str:
    values = tensor_util.make_ndarray(tensor_proto).reshape(-1).tolist()
    parts = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]
    # A rank>0 text tensor is a table/list in the text plugin; one string per
    # event keeps the output shape simple.
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logdir")
    ap.add_argument("--keep-orphaned", action="store_true",
                    help="do not drop events orphaned by a restart (TensorBoard's UI drops them)")
    args = ap.parse_args()

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        print(f"check_tensorboard: {logdir} is not a directory", file=sys.stderr)
        return 2
    if not event_files(logdir):
        nested = sorted({str(p.parent) for p in logdir.rglob("*tfevents*") if p.is_file()})
        hint = f" (event files exist in subdirectories: {', '.join(nested)})" if nested else ""
        print(f"check_tensorboard: no TensorBoard event file (*tfevents*) in {logdir}{hint}", file=sys.stderr)
        return 2

    acc = ea.EventAccumulator(str(logdir), size_guidance=KEEP_ALL, purge_orphaned_data=not args.keep_orphaned)
    acc.Reload()
    tags = acc.Tags()

    scalars = {}
    for tag in tags[ea.SCALARS]:
        scalars[tag] = [[e.step, finite_or_none(float(e.value))] for e in acc.Scalars(tag)]

    text = {}
    for tag in tags[ea.TENSORS]:
        plugin = plugin_of(acc, tag)
        events = acc.Tensors(tag)
        if plugin == "text":
            text[tag] = [decode_text(e.tensor_proto) for e in events]
        elif plugin == "scalars":
            # Newer writers store scalars as rank-0 tensors instead of
            # simple_value; report them alongside the classic ones.
            scalars.setdefault(tag, []).extend(
                [e.step, finite_or_none(float(tensor_util.make_ndarray(e.tensor_proto).item()))] for e in events
            )

    json.dump({"scalars": scalars, "text": text}, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
