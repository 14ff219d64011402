#!/usr/bin/env python3
"""Hugging Face PEFT's logits for a LoRA checkpoint written by meft.

Loads the base model with transformers (fp32, eager attention, CPU), attaches the checkpoint
with peft.PeftModel.from_pretrained exactly as a user would, and checks that PEFT took all of it:
every tensor of adapter_model.safetensors is in a LoRA layer of the model (bit for bit), no LoRA
layer is left without one, every layer's scaling is lora_alpha / r, and PEFT warned about nothing
(unknown config keys, missing adapter keys). Then writes, for each prompt of --prompts, the
logits at a vocabulary subset (every position's top 8 and 64 seeded random ids, sorted), the
argmax over the full vocabulary and its lead over the runner-up.

--prompts: {"prompts": [{"name": str, "input_ids": [int, ...]}, ...]}
--output:  {"source", "peft_version", "transformers_version", "torch_version", "adapter_config",
            "prompts": [{"name", "input_ids", "ids", "logits" ([t][j] = logit of ids[j] at t),
                         "argmax", "top2_margin"}, ...]}

Used by tests/gpu_worker/smollm2_peft_test.cc (the live check runs it on a checkpoint meft has
just trained; the golden under tests/golden/peft/ was written by it, see
tests/golden/make_peft_lora_golden.sh). Exits non-zero, saying why, when PEFT does not load the
checkpoint completely.
"""

import argparse
import json
import math
import os
import sys
import warnings

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOP_K = 8
RANDOM_IDS = 64
DIGITS = 8


def fail(message):
    print(f"peft_lora_logits.py: {message}", file=sys.stderr)
    sys.exit(1)


def check_loaded(model, checkpoint, config):
    """Every saved tensor is in the model and every LoRA parameter came from the file."""
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    lora = {name for name in params if ".lora_" in name}
    expected = {}
    for name, tensor in saved.items():
        if not name.endswith(".weight"):
            fail(f"adapter_model.safetensors: unexpected tensor {name}")
        # PEFT stores "...lora_A.weight"; the live module is "...lora_A.default.weight".
        stem = name[: -len(".weight")]
        expected[f"{stem}.default.weight"] = tensor
    if set(expected) != lora:
        fail(
            "PEFT's LoRA parameters differ from the file's tensors: only in the model "
            f"{sorted(lora - set(expected))[:5]}, only in the file {sorted(set(expected) - lora)[:5]}"
        )
    for name, tensor in expected.items():
        if not torch.equal(params[name].detach(), tensor):
            fail(f"{name}: PEFT holds other values than adapter_model.safetensors")
    want = config["lora_alpha"] / config["r"]
    layers = 0
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            layers += 1
            if not math.isclose(scaling["default"], want, rel_tol=1e-12):
                fail(f"{name}: PEFT scales by {scaling['default']}, not lora_alpha / r = {want}")
    if layers * 2 != len(saved):
        fail(f"{layers} LoRA layers for {len(saved)} tensors")
    return len(saved)


def round_sig(x):
    return float(f"{x:.{DIGITS}g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="the base model (Hugging Face folder)")
    parser.add_argument("--checkpoint", required=True, help="meft's checkpoint-<step> folder")
    parser.add_argument("--prompts", required=True, help="JSON file with the prompts' token ids")
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args()

    torch.manual_seed(0)
    with open(os.path.join(args.checkpoint, "adapter_config.json")) as f:
        config = json.load(f)
    with open(args.prompts) as f:
        prompts = json.load(f)["prompts"]

    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model, args.checkpoint)
    for w in caught:
        text = str(w.message)
        if "keyword arguments" in text or "adapter keys" in text or "peft_type" in text:
            fail(f"PEFT warned while loading {args.checkpoint}: {text}")
    model.eval()
    tensors = check_loaded(model, args.checkpoint, config)

    out_prompts = []
    generator = torch.Generator().manual_seed(0)
    for prompt in prompts:
        ids = torch.tensor([prompt["input_ids"]], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()  # [T, V]
        top2 = logits.topk(2, dim=-1)
        chosen = set(logits.topk(TOP_K, dim=-1).indices.flatten().tolist())
        chosen |= set(torch.randperm(logits.shape[-1], generator=generator)[:RANDOM_IDS].tolist())
        vocab = sorted(chosen)
        at = logits[:, vocab]
        out_prompts.append(
            {
                "name": prompt["name"],
                "input_ids": prompt["input_ids"],
                "ids": vocab,
                "logits": [[round_sig(v) for v in row] for row in at.tolist()],
                "argmax": top2.indices[:, 0].tolist(),
                "top2_margin": [round_sig(v) for v in (top2.values[:, 0] - top2.values[:, 1]).tolist()],
            }
        )
        print(
            f"{prompt['name']}: {ids.shape[1]} positions, {len(vocab)} ids, "
            f"smallest top-2 margin {min(out_prompts[-1]['top2_margin']):.4g}"
        )
    result = {
        "source": "peft.PeftModel.from_pretrained on transformers' AutoModelForCausalLM, fp32, eager",
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "adapter_config": {k: config.get(k) for k in ("r", "lora_alpha", "target_modules",
                                                      "layers_to_transform")},
        "prompts": out_prompts,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, separators=(",", ":"))
        f.write("\n")
    print(f"PEFT {peft.__version__} loaded all {tensors} LoRA tensors; wrote {args.output}")


if __name__ == "__main__":
    main()
