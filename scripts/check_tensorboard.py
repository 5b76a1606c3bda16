#!/usr/bin/env python3
"""Dump a TensorBoard event directory as JSON, the way TensorBoard itself reads it.

    python scripts/check_tensorboard.py LOGDIR

Prints to stdout:
    {"scalars": {tag: [[step, value], ...]}, "text": {tag: [str, ...]},
     "hparams": {"session_start_info": {...} | null, "session_end_info": {...} | null,
                 "experiment": {...} | null}}

The "hparams" entries are the HParams plugin's messages as TensorBoard keeps
them (the first of each tag in the run, decoded by the plugin's own metadata
parsers), in protobuf JSON form with proto field names, e.g.
    {"hparams": {"optimizer.lr": 0.002, ...}, "start_time_secs": 1.7e9}
    {"status": "STATUS_SUCCESS", "end_time_secs": 1.7e9}

    python scripts/check_tensorboard.py --hparams-table LOGDIR

instead reads LOGDIR as TensorBoard's --logdir (each subdirectory with event
files is a run) and prints what the HParams tab shows, computed by the
plugin's own request handlers over TensorBoard's data provider:
    {"experiment": GetExperiment response, "session_groups": [SessionGroup, ...]}

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

from google.protobuf import json_format
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


def as_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def decode_hparams(acc: ea.EventAccumulator) -> dict:
    from tensorboard.plugins.hparams import metadata as hp

    # The plugin reads its data from the summary metadata, of which the
    # accumulator keeps the first per tag, as TensorBoard's own does.
    parsers = {
        "session_start_info": (hp.SESSION_START_INFO_TAG, hp.parse_session_start_info_plugin_data),
        "session_end_info": (hp.SESSION_END_INFO_TAG, hp.parse_session_end_info_plugin_data),
        "experiment": (hp.EXPERIMENT_TAG, hp.parse_experiment_plugin_data),
    }
    out = {}
    for key, (tag, parse) in parsers.items():
        try:
            plugin_data = acc.SummaryMetadata(tag).plugin_data
        except KeyError:
            out[key] = None
            continue
        if plugin_data.plugin_name != hp.PLUGIN_NAME:
            raise ValueError(f"{tag} belongs to plugin {plugin_data.plugin_name!r}, not {hp.PLUGIN_NAME!r}")
        out[key] = as_json(parse(plugin_data.content))
    return out


def hparams_table(logdir: Path) -> dict:
    """The HParams tab's data, from the plugin's handlers as the server runs them."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import backend_context
    from tensorboard.plugins.hparams import get_experiment
    from tensorboard.plugins.hparams import list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    backend = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=str(logdir)))
    ctx = context.RequestContext()
    experiment = get_experiment.Handler(ctx, backend, "", api_pb2.GetExperimentRequest()).run()
    # What the tab asks for: every status, 1000 groups, no filters.
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING,
        ],
        start_index=0,
        slice_size=1000,
    )
    groups = list_session_groups.Handler(ctx, backend, "", request).run()
    return {
        "experiment": as_json(experiment),
        "session_groups": [as_json(g) for g in groups.session_groups],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logdir")
    ap.add_argument("--keep-orphaned", action="store_true",
                    help="do not drop events orphaned by a restart (TensorBoard's UI drops them)")
    ap.add_argument("--hparams-table", action="store_true",
                    help="read LOGDIR as TensorBoard's --logdir and print the HParams tab's data")
    args = ap.parse_args()

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        print(f"check_tensorboard: {logdir} is not a directory", file=sys.stderr)
        return 2
    if args.hparams_table:
        json.dump(hparams_table(logdir), sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
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

    json.dump({"scalars": scalars, "text": text, "hparams": decode_hparams(acc)}, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
