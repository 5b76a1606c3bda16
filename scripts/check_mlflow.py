#!/usr/bin/env python3
"""Dump an MLflow experiment as JSON, read with the official MLflow client.

    python scripts/check_mlflow.py TRACKING_URI EXPERIMENT_NAME

Prints to stdout:
    {"experiment_id": "1", "runs": [{"run_id", "run_name", "status", "params": {k: v},
      "tags": {k: v}, "metrics": {key: [[step, value], ...]}, "artifacts": [path, ...]}]}

Every metric's full history is listed in step order (then timestamp), duplicates included, so a
caller can check that no step was logged twice. Non-finite values are written as null so the
output stays strict JSON. Exits with status 2 if the experiment does not exist.
"""

import argparse
import json
import math
import sys

from mlflow.tracking import MlflowClient


def artifact_paths(client, run_id, path=None):
    paths = []
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            paths.extend(artifact_paths(client, run_id, info.path))
        else:
            paths.append(info.path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("experiment")
    args = parser.parse_args()
    client = MlflowClient(tracking_uri=args.uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"no experiment {args.experiment!r} at {args.uri}", file=sys.stderr)
        sys.exit(2)
    runs = []
    for run in client.search_runs([experiment.experiment_id]):
        run_id = run.info.run_id
        metrics = {}
        for key in run.data.metrics:
            history = sorted(
                client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)
            )
            metrics[key] = [
                [m.step, m.value if math.isfinite(m.value) else None] for m in history
            ]
        runs.append(
            {
                "run_id": run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "params": dict(run.data.params),
                "tags": dict(run.data.tags),
                "metrics": metrics,
                "artifacts": sorted(artifact_paths(client, run_id)),
            }
        )
    print(json.dumps({"experiment_id": experiment.experiment_id, "runs": runs}))


if __name__ == "__main__":
    main()
