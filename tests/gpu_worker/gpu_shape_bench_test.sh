#!/usr/bin/env bash
# The CPU dry run of meft_gpu_shape_bench (bench/gpu_shape_bench.cc): its tiny shape with real
# meft-param-server processes over shared memory. Checks the structure of results.json (every
# field present, every number finite, the counters consistent with the run's settings) and that
# results.md has a row per configuration. Never checks speed.
# Usage: gpu_shape_bench_test.sh MEFT_GPU_SHAPE_BENCH MEFT_PARAM_SERVER
set -euo pipefail
bench=$1
server_bin=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$bench" --shape tiny --device cpu --server-binary "$server_bin" --out "$dir/out" \
  >"$dir/stdout" 2>"$dir/stderr" || {
  cat "$dir/stderr" "$dir/out"/server-*.log 2>/dev/null
  fail "the tiny run failed"
}
[ -s "$dir/out/results.json" ] || fail "no results.json"
[ -s "$dir/out/results.md" ] || fail "no results.md"

python3 - "$dir/out" <<'PY' || fail "results.json/results.md do not have the expected structure"
import json, math, sys

out = sys.argv[1]
r = json.load(open(f"{out}/results.json"))
errors = []

def check(cond, what):
    if not cond:
        errors.append(what)

# Numbers are finite everywhere; null only where the CPU has no CUDA allocator.
NULL_ON_CPU = {"device_peak_bytes", "device_rest_bytes"}
def walk(x, path):
    if isinstance(x, dict):
        for k, v in x.items():
            walk(v, path + [k])
    elif isinstance(x, list):
        for i, v in enumerate(x):
            walk(v, path + [str(i)])
    elif x is None:
        check(path[-1] in NULL_ON_CPU, "null at " + ".".join(path))
    elif isinstance(x, float):
        check(math.isfinite(x), "not finite at " + ".".join(path))
walk(r, [])

check(r.get("schema") == "meft_gpu_shape_bench/1", "schema")
check(r.get("shape_name") == "tiny", "shape_name")
shape, settings = r["shape"], r["settings"]
for k in ["layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "vocab_size",
          "parameters", "dtype", "device", "micro_batch", "tokens", "grad_accum",
          "adapter_layers"]:
    check(k in shape, "shape." + k)
check(shape["device"] == "cpu" and shape["dtype"] == "fp32", "CPU run in fp32")
for k in ["cpu", "hardware_threads", "host_memory_bytes", "libtorch", "cuda_devices"]:
    check(k in r["machine"], "machine." + k)

names = [c["name"] for c in r["configs"]]
check(names == ["parallel r=96", "meft r=96", "meft r=512"], f"configurations {names}")
steps, warmup = settings["steps"], settings["warmup"]
d, layers = shape["hidden_size"], shape["adapter_layers"]
for c in r["configs"]:
    n = c["name"]
    check("error" not in c, f"{n}: error {c.get('error')}")
    if "error" in c:
        continue
    m, s, t = c["memory"], c["speed"], c["traffic"]
    for k in ["device", "device_peak_bytes", "device_weights_bytes", "predicted_device_bytes",
              "predicted_adapter_device_bytes", "device_rest_bytes", "worker_peak_rss_bytes",
              "device_peak_is_per_config", "worker_peak_rss_is_per_config"]:
        check(k in m, f"{n}: memory.{k}")
    check(m["device"] == "cpu" and m["device_peak_bytes"] is None, f"{n}: no CUDA peak on the CPU")
    check(m["worker_peak_rss_bytes"] > 0, f"{n}: worker RSS")
    for k in ["measured_steps", "tokens_per_step", "tokens_per_second", "step_seconds",
              "compute_seconds", "wait_seconds", "transfer_seconds", "wait_per_layer_seconds",
              "server_call_seconds", "server_lookup_seconds", "server_optimizer_seconds",
              "stage_seconds", "step_seconds_each"]:
        check(k in s, f"{n}: speed.{k}")
    check(s["measured_steps"] == steps and len(s["step_seconds_each"]) == steps,
          f"{n}: {steps} measured steps")
    check(s["tokens_per_step"] == shape["micro_batch"] * shape["tokens"] * shape["grad_accum"],
          f"{n}: tokens per step")
    check(s["tokens_per_second"] > 0 and s["step_seconds"] > 0, f"{n}: speed positive")
    check(abs(s["compute_seconds"] + s["wait_seconds"] + s["transfer_seconds"]
              - s["step_seconds"]) <= 1e-9 + 1e-6 * s["step_seconds"], f"{n}: split adds up")
    check(len(c["losses"]) == warmup + steps, f"{n}: one loss per step")
    params = t["adapter_params"]
    check(t["adapter_fp32_bytes"] == 4 * params, f"{n}: adapter size")
    if c["adapter"] == "parallel":
        check(params == 2 * c["rows"] * d * layers, f"{n}: parallel parameters")
        check(m["predicted_device_bytes"] == m["device_weights_bytes"] + 16 * params,
              f"{n}: parallel prediction")
        check(s["wait_seconds"] == 0 and t["lookups_per_step"] == 0, f"{n}: no server")
    else:
        check(params == (2 * c["rows"] + t["experts"]) * d * layers, f"{n}: meft parameters")
        check(m["server_peak_rss_bytes"] > 0, f"{n}: server RSS")
        check(m["predicted_server_bytes"] == 16 * params, f"{n}: server prediction")
        # One training lookup per adapter layer and micro-batch (overlap, no prefetch).
        check(t["lookups_per_step"] == layers * shape["grad_accum"], f"{n}: lookups per step")
        check(0 < t["rows_per_lookup"] <= c["rows"], f"{n}: rows per lookup")
        check(abs(t["rows_per_lookup_over_r"] * c["rows"] - t["rows_per_lookup"]) < 1e-9,
              f"{n}: |S| / r")
        check(abs(m["predicted_adapter_device_bytes"] - 8 * t["rows_per_lookup"] * d * layers)
              < 1e-6 * m["predicted_adapter_device_bytes"], f"{n}: meft prediction")
        # The worker's meter saw payload both ways (meft-worker's MeteredParamClient is on).
        check(t["worker_bytes_sent_per_step"] > 0 and t["worker_bytes_received_per_step"] > 0,
              f"{n}: worker meter")
        # The tensors crossed through the shared-memory arena.
        check(t["arena_bytes_per_step"] > 0, f"{n}: arena bytes")
        check(t["bytes_to_server_per_step"] > 0 and t["bytes_from_server_per_step"] > 0,
              f"{n}: bytes both ways")
        check(abs((t["bytes_to_server_per_step"] + t["bytes_from_server_per_step"])
                  / t["adapter_fp32_bytes"] - t["bytes_per_step_over_adapter"]) < 1e-9,
              f"{n}: bytes per step over the adapter size")

comparisons = r["comparisons"]
check([c["what"] for c in comparisons] ==
      ["peak memory of meft r=96 / parallel r=96", "tokens/s of meft r=96 / parallel r=96"],
      f"comparisons {[c['what'] for c in comparisons]}")
check(all(c["value"] > 0 for c in comparisons), "comparison values positive")
check(len(r["notes"]) >= 4, "notes")

md = open(f"{out}/results.md").read()
check("| config | peak device memory |" in md, "results.md header")
for n in names:
    check(f"| {n} |" in md, f"results.md row for {n}")

for e in errors:
    print("results:", e)
sys.exit(1 if errors else 0)
PY
echo "PASS"
