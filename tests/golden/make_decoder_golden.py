#!/usr/bin/env python3
"""Golden logits from Hugging Face transformers for meft's LLaMA / Mistral decoder.

For each tiny model (llama_tiny: GQA, linear RoPE scaling, untied head; mistral_tiny: GQA,
sliding window 4, tied embeddings) builds LlamaForCausalLM / MistralForCausalLM from a small
LlamaConfig / MistralConfig (fp32, eval mode, eager attention), loads the seeded random weights
below into it and writes <out>/transformers/<model>/ with
  config.json        written by save_pretrained
  model.safetensors  fp32 weights, written by save_pretrained
  golden.json        {"source", "transformers_version", "torch_version", "input_ids",
                      "attention_mask", "logits_shape", "logits"}
"logits" is the [batch, seq, vocab] fp32 output of model(input_ids, attention_mask) flattened
row-major. The batch has two sequences; the second is right-padded (attention_mask 0 at the
end). Logits at padded positions are included but are not meaningful: compare only where
attention_mask is 1.

Regenerate with the pinned environment (scripts/python-env.sh):
    "$(scripts/python-env.sh | tail -1)/bin/python" tests/golden/make_decoder_golden.py
"""
import argparse
import json
import os
import shutil
import sys

import torch

SEQ_LEN = 12
PAD_LEN = 4  # Trailing padding of the second sequence.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

MODELS = {
    "llama_tiny": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling_factor": 2.0,  # rope_scaling {"type": "linear", "factor": 2.0}
        "sliding_window": None,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "seed": 1001,
    },
    "mistral_tiny": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling_factor": None,
        "sliding_window": 4,  # Smaller than SEQ_LEN, so it changes the result.
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "seed": 2002,
    },
}


def head_dim(spec):
    return spec["hidden_size"] // spec["num_attention_heads"]


def make_weights(spec):
    """Seeded random fp32 weights under HF names. Larger than HF's N(0, 0.02) init so that
    every part of the network visibly moves the logits."""
    gen = torch.Generator().manual_seed(spec["seed"])
    d, f, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    hd = head_dim(spec)
    nq, nkv = spec["num_attention_heads"], spec["num_key_value_heads"]

    def linear(out_features, in_features):
        return torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=gen)

    w = {"model.embed_tokens.weight": torch.randn(v, d, generator=gen)}
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = linear(nq * hd, d)
        w[p + "self_attn.k_proj.weight"] = linear(nkv * hd, d)
        w[p + "self_attn.v_proj.weight"] = linear(nkv * hd, d)
        w[p + "self_attn.o_proj.weight"] = linear(d, nq * hd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = linear(f, d)
        w[p + "mlp.up_proj.weight"] = linear(f, d)
        w[p + "mlp.down_proj.weight"] = linear(d, f)
    w["model.norm.weight"] = norm(d)
    if not spec["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(v, d)
    return w


def make_inputs(spec):
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(3, spec["vocab_size"], (2, SEQ_LEN), generator=gen)
    ids[:, 0] = BOS_ID
    mask = torch.ones(2, SEQ_LEN, dtype=torch.int64)
    mask[1, SEQ_LEN - PAD_LEN:] = 0
    ids[1, SEQ_LEN - PAD_LEN:] = PAD_ID
    return ids, mask


# ---------------------------------------------------------------------------------------------
# transformers


def build_hf_model(spec, weights):
    import inspect
    import transformers

    config_cls = (transformers.LlamaConfig if spec["model_type"] == "llama"
                  else transformers.MistralConfig)
    model_cls = (transformers.LlamaForCausalLM if spec["model_type"] == "llama"
                 else transformers.MistralForCausalLM)
    kwargs = dict(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], head_dim=head_dim(spec),
        hidden_act="silu", rms_norm_eps=spec["rms_norm_eps"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=spec["tie_word_embeddings"], bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    if spec["model_type"] == "mistral":
        kwargs["sliding_window"] = spec["sliding_window"]
    # transformers 5 replaced rope_theta / rope_scaling by rope_parameters.
    params = inspect.signature(config_cls.__init__).parameters
    if "rope_parameters" in params or hasattr(config_cls, "rope_parameters"):
        rope = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
        if spec["rope_scaling_factor"]:
            rope.update(rope_type="linear", factor=spec["rope_scaling_factor"])
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = spec["rope_theta"]
        if spec["rope_scaling_factor"]:
            kwargs["rope_scaling"] = {"type": "linear", "factor": spec["rope_scaling_factor"]}
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    try:
        model = model_cls(config, attn_implementation="eager")
    except TypeError:  # Versions without the kwarg.
        model = model_cls(config)
    model = model.to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")
               and not (spec["tie_word_embeddings"] and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weight names do not match transformers: missing {missing}, "
                         f"unexpected {unexpected}")
    return model, transformers.__version__


def write_model(out_root, name, spec):
    import transformers

    out = os.path.join(out_root, "transformers", name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    weights = make_weights(spec)
    ids, mask = make_inputs(spec)
    model, version = build_hf_model(spec, weights)
    model.save_pretrained(out, safe_serialization=True)
    # The decoder needs no generation settings; keep the folder to what is tested.
    if os.path.exists(os.path.join(out, "generation_config.json")):
        os.remove(os.path.join(out, "generation_config.json"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    golden = {
        "source": f"transformers {version} {type(model).__name__} (eager attention)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(f"{x:.9g}") for x in logits.flatten().tolist()],
    }
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="golden root; files go to <out>/transformers/<model>/")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for name, spec in MODELS.items():
        write_model(args.out, name, spec)


if __name__ == "__main__":
    main()
