#!/usr/bin/env python3
"""Writes results.json and results.md for the device kit's run.sh (standard library only).

Reads, all from --out unless said otherwise: steps.tsv (one line per step: name, status, seconds,
detail; written by run.sh), tests/*.json (GoogleTest's JSON reports), bench/results.json (the
benchmark's results, any JSON value, embedded as it is) and bench/results.md (its Markdown,
appended as it is), gpus.csv (nvidia-smi's name, memory, driver), and the kit's kit.env.
"""

import argparse
import datetime
import json
import os
import platform
import sys


def read_kit_env(kit):
    env = {}
    try:
        with open(os.path.join(kit, "kit.env"), encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep:
                    env[key] = value
    except OSError as e:
        env["error"] = str(e)
    return env


def read_steps(out):
    steps = []
    try:
        with open(os.path.join(out, "steps.tsv"), encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                parts += [""] * (4 - len(parts))
                name, status, seconds, detail = parts[:4]
                steps.append({"name": name, "status": status,
                              "seconds": int(seconds) if seconds.isdigit() else None,
                              "detail": detail})
    except OSError:
        pass
    return steps


def read_tests(out):
    """Per test program: counts by outcome and every test that did not pass."""
    programs = []
    folder = os.path.join(out, "tests")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith(".json"):
            continue
        program = {"program": name[:-len(".json")], "passed": 0, "failed": 0, "skipped": 0,
                   "tests": []}
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            program["error"] = f"unreadable report: {e}"
            programs.append(program)
            continue
        for suite in report.get("testsuites", []):
            for test in suite.get("testsuite", []):
                full = f"{suite.get('name')}.{test.get('name')}"
                if test.get("failures"):
                    outcome = "failed"
                elif test.get("result") == "SKIPPED":
                    outcome = "skipped"
                else:
                    outcome = "passed"
                program[outcome] += 1
                program["tests"].append({"name": full, "outcome": outcome,
                                         "time": test.get("time"),
                                         "failures": [x.get("failure", "")
                                                      for x in test.get("failures", [])]})
        programs.append(program)
    return programs


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError:
        return None
    except ValueError as e:
        return {"error": f"{path}: not JSON: {e}"}


def read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def machine(out):
    gpus = []
    text = read_text(os.path.join(out, "gpus.csv")) or ""
    for line in text.splitlines():
        fields = [x.strip() for x in line.split(",")]
        if len(fields) == 3:
            gpus.append({"name": fields[0], "memory": fields[1], "driver": fields[2]})
    mem_kib = None
    for line in (read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {"hostname": platform.node(), "cpus": os.cpu_count(),
            "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None, "gpus": gpus,
            "python": sys.version.split()[0]}


def markdown(result, bench_md):
    lines = [f"# meft device kit: {result['status']}", ""]
    kit = result["kit"]
    m = result["machine"]
    gpus = ", ".join(f"{g['name']} ({g['memory']}, driver {g['driver']})" for g in m["gpus"])
    lines += [f"- mode {result['mode']}, shape {result['shape']}, "
              f"{result['seconds']} s of a {result['budget_seconds']} s budget",
              f"- kit: commit {kit.get('commit', '?')}, torch {kit.get('torch_version', '?')}, "
              f"sm {kit.get('cuda_arch', '?')}",
              f"- machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, GPUs: {gpus or 'none'}", "",
              "| step | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in result["steps"]:
        detail = s["detail"].replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    if result["tests"]:
        lines += ["", "| test program | passed | failed | skipped |", "| --- | --- | --- | --- |"]
        for p in result["tests"]:
            lines.append(f"| {p['program']} | {p['passed']} | {p['failed']} | {p['skipped']} |")
        failed = [t for p in result["tests"] for t in p["tests"] if t["outcome"] == "failed"]
        for t in failed:
            lines += ["", f"**{t['name']}** failed:", "```", *t["failures"], "```"]
    if bench_md:
        lines += ["", bench_md.rstrip()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kit", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--budget", type=int, required=True)
    a = ap.parse_args()

    steps = read_steps(a.out)
    ok = bool(steps) and all(s["status"] in ("passed", "skipped") for s in steps)
    if a.mode == "gpu":
        ok = ok and all(s["status"] == "passed" for s in steps)
    result = {
        "status": "passed" if ok else "failed",
        "mode": a.mode,
        "shape": a.shape,
        "seconds": a.seconds,
        "budget_seconds": a.budget,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kit": read_kit_env(a.kit),
        "machine": machine(a.out),
        "steps": steps,
        "tests": read_tests(a.out),
        "benchmark": read_json(os.path.join(a.out, "bench", "results.json")),
    }
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(os.path.join(a.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result, read_text(os.path.join(a.out, "bench", "results.md"))))


if __name__ == "__main__":
    main()
