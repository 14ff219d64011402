#!/usr/bin/env python3
"""Turns one bench/report.sh run folder into one JSON line (appended to --out).

Reads, all written by bench/report.sh into the run folder:
  train.log        meft-worker train's output ("trained N steps in X s; final loss L")
  worker.time      /usr/bin/time -f '%M %e': the worker's peak RSS (KiB) and wall seconds
  worker.metrics   the worker's Prometheus text, scraped after its last step
  server.metrics   the server's Prometheus text after training (meft runs only)
  server.status    VmHWM/VmRSS of the server's /proc/PID/status after training
  server.log       the server's log (E, the number of key-experts it chose)
  eval/metrics.json  meft-worker eval's scores (absent when the run was not evaluated)
The remaining KEY=VALUE arguments (the run's settings) are copied into the record.
Standard library only.
"""
import argparse
import json
import os
import re
import sys

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def parse_prometheus(text):
    """{name or name{labels}: value}, without histogram buckets."""
    out = {}
    for line in (text or "").splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m or m.group(1).endswith("_bucket"):
            continue
        if not (m.group(1).startswith("meft_")):
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            pass
    return out


def tensor_shapes(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def count_parameters(path):
    total = 0
    for shape in tensor_shapes(path).values():
        p = 1
        for s in shape:
            p *= s
        total += p
    return total


def number(text):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--server-config", default="")
    ap.add_argument("settings", nargs="*", help="KEY=VALUE")
    a = ap.parse_args()
    rec = {}
    for kv in a.settings:
        key, _, value = kv.partition("=")
        rec[key] = number(value)
    rec["worker_config"] = a.config
    rec["server_config"] = a.server_config or None

    d = a.run_dir
    log = read(os.path.join(d, "train.log")) or ""
    m = re.search(r"trained (\d+) steps in ([0-9.]+) s; final loss ([0-9.eE+-]+|nan|inf)", log)
    if not m:
        sys.exit(f"collect.py: {d}/train.log has no 'trained N steps' line")
    rec["trained_steps"] = int(m.group(1))
    rec["train_step_seconds"] = float(m.group(2))
    rec["final_loss"] = float(m.group(3))

    t = (read(os.path.join(d, "worker.time")) or "").split()
    if len(t) >= 2:
        rec["worker_max_rss_bytes"] = int(t[-2]) * 1024
        rec["worker_wall_s"] = float(t[-1])

    rec["worker_metrics"] = parse_prometheus(read(os.path.join(d, "worker.metrics")))
    rec["server_metrics"] = parse_prometheus(read(os.path.join(d, "server.metrics")))
    status = read(os.path.join(d, "server.status")) or ""
    for key in ("VmHWM", "VmRSS"):
        s = re.search(key + r":\s+(\d+) kB", status)
        if s:
            rec["server_" + key.lower() + "_bytes"] = int(s.group(1)) * 1024
    slog = read(os.path.join(d, "server.log")) or ""
    e = re.search(r"\bE\s*=\s*(\d+)", slog) or re.search(r"experts[ =:]+(\d+)", slog)
    if e:
        rec["experts_actual"] = int(e.group(1))

    # Trainable parameters: counted from the adapter's own safetensors header (the worker's
    # checkpoint for parallel/lora, the server's for meft).
    for sub in ("out", "server"):
        base = os.path.join(d, sub)
        if not os.path.isdir(base):
            continue
        for ck in sorted(os.listdir(base)):
            st = os.path.join(base, ck, "adapter_model.safetensors")
            if ck.startswith("checkpoint-") and os.path.isfile(st):
                rec["trainable_parameters"] = count_parameters(st)
                rec["adapter_tensors"] = tensor_shapes(st)

    ev = read(os.path.join(d, "eval", "metrics.json"))
    if ev:
        rec["em"] = json.loads(ev)["metrics"]["nq_substring_em"]

    with open(a.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    em = f", EM {rec['em']:.3f}" if "em" in rec else ""
    print(f"   {rec.get('exp')}/{rec.get('name')}: {rec['trained_steps']} steps in "
          f"{rec['train_step_seconds']:.1f} s, loss {rec['final_loss']:.3f}{em}")


if __name__ == "__main__":
    main()
