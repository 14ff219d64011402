"""Compares meft's evaluation logits with transformers + meft_adapter on an exported folder.

Used by tests/gpu_worker/export_test.cc:
    PYTHONPATH=python python python/tests/compare_logits.py --model-dir M --export DIR \
        --expected expected.safetensors --atol 1e-4
expected.safetensors holds input_ids and attention_mask [B, T] (int64, left padding) and meft's
fp32 logits [B, T, V]. Exits 1 when a logit at a real position differs by more than --atol, or
when the adapter moves the logits by less than 10 * atol (an adapter that does nothing must not
pass). Prints one JSON line with the measurements.
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import meft_adapter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--atol", type=float, required=True)
    a = ap.parse_args()

    torch.manual_seed(0)
    expected = load_file(a.expected)
    ids, mask, want = expected["input_ids"], expected["attention_mask"], expected["logits"]
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    # meft counts positions over real tokens only (left padding); transformers' forward needs
    # them spelled out.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).logits.float()

    base = logits()
    handle = meft_adapter.attach(model, a.export)
    got = logits()
    handle.remove()

    diff = (got - want).abs()[real].max().item()
    effect = (want - base).abs()[real].max().item()
    argmax_equal = (got.argmax(-1) == want.argmax(-1))[real].float().mean().item()
    c = handle.config
    report = {"adapter": c.adapter, "layers": c.layers, "positions": int(real.sum()),
              "max_abs_diff": diff, "atol": a.atol, "adapter_effect": effect,
              "argmax_equal": argmax_equal}
    if c.adapter == "meft":
        report.update(mode=c.mode, gated=c.gated, row_dtype=c.row_dtype,
                      prefetch_layers=c.prefetch_layers, max_rows=c.max_rows)
    print(json.dumps(report))
    if not diff <= a.atol:
        print(f"FAIL: logits differ by {diff:.3g} > atol {a.atol:g}", file=sys.stderr)
        return 1
    if not effect > 10 * a.atol:
        print(f"FAIL: the adapter moves the logits by only {effect:.3g} (<= 10 * atol): the "
              "comparison would not see a missing adapter", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
