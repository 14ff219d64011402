#!/usr/bin/env python3
"""Plots a training run: loss, learning rate and evaluation metrics against optimizer steps.

Usage: plot-run.py RUN_DIR [--output PNG]

Reads RUN_DIR/train_log.jsonl (one JSON object per logged step, written by `meft-worker train`)
and writes a PNG (default RUN_DIR/train_log.png) with one panel each for "loss",
"learning_rate" and, when the log has any, the "eval_*" metrics (exact match and the others
that `train.eval_every` recorded). Needs matplotlib (the pinned environment of
scripts/python-env.sh has it). Exit status 1, with a message naming the file and line, for a
missing or malformed log.
"""

import argparse
import json
import math
import os
import sys


class LogError(Exception):
    pass


def read_log(path):
    """The records of train_log.jsonl, in file order; LogError names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise LogError(f"{path}: not found (meft-worker train writes it into output_dir)")
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e.strerror}")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogError(f"{where}: not JSON ({e.msg} at column {e.colno})")
        if not isinstance(record, dict):
            raise LogError(f"{where}: not a JSON object")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise LogError(f"{where}: field \"step\" is missing or not an integer")
        for key, value in record.items():
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float))):
                raise LogError(f"{where}: field \"{key}\" is not a number")
        records.append(record)
    if not records:
        raise LogError(f"{path}: no records")
    return records


def series(records, key):
    """(steps, values) of the records that carry a finite `key`."""
    points = [(r["step"], r[key]) for r in records
              if r.get(key) is not None and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records, output):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for r in records for k in r if k.startswith("eval_")})
    panels = [("loss", ["loss"]), ("learning rate", ["learning_rate"])]
    if eval_keys:
        panels.append(("evaluation", eval_keys))
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(8, 2.6 * len(panels)),
                             squeeze=False)
    drawn = []
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=key[len("eval_"):] if key.startswith("eval_") else key)
                drawn.append(key)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1 or keys[0].startswith("eval_"):
            ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run's output_dir (holds train_log.jsonl)")
    parser.add_argument("--output", help="PNG to write (default RUN_DIR/train_log.png)")
    args = parser.parse_args(argv)
    log = os.path.join(args.run_dir, "train_log.jsonl")
    output = args.output or os.path.join(args.run_dir, "train_log.png")
    try:
        records = read_log(log)
    except LogError as e:
        print(f"plot-run: error: {e}", file=sys.stderr)
        return 1
    drawn = plot(records, output)
    print(f"plot-run: {len(records)} records (steps {records[0]['step']}-{records[-1]['step']}): "
          f"{', '.join(drawn)} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
