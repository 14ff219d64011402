#!/usr/bin/env python3
"""Golden logits for meft's LLaMA / Mistral decoder (gpu_worker/model/llama.h).

For each tiny model (llama_tiny: GQA, linear RoPE scaling, untied head; mistral_tiny: GQA,
sliding window 4, tied embeddings) writes <out>/<source>/<model>/ with
  config.json        Hugging Face style model config
  model.safetensors  fp32 weights under Hugging Face tensor names
  golden.json        {"source", "input_ids", "attention_mask", "logits_shape", "logits"}
"logits" is the [batch, seq, vocab] fp32 tensor flattened row-major. The batch has two
sequences; the second is right-padded (attention_mask 0 at the end). Logits at padded
positions are included but are not meaningful: compare only where attention_mask is 1.

Two sources:
  --source transformers  (default when `import transformers` works) builds LlamaForCausalLM /
      MistralForCausalLM from a small LlamaConfig / MistralConfig (fp32, eval mode, eager
      attention), loads the seeded random weights below into it, writes config.json and
      model.safetensors with save_pretrained and the logits of model(input_ids, attention_mask).
  --source plain-torch  writes the same weights itself, an HF-style config.json by hand, and
      logits from the independent plain-PyTorch forward in this file, which follows the
      semantics of Hugging Face's modeling_llama.py / modeling_mistral.py. Used where
      transformers is not installed; its golden.json says so in "source".
Both sources use identical weights and inputs, so their logits must agree to fp32 rounding;
the transformers run also prints its distance to the plain-PyTorch forward as a cross-check.

Regenerate (Debian: apt-get install python3-torch; transformers via pip where available):
    python3 tests/golden/make_decoder_golden.py --source plain-torch
    python3 tests/golden/make_decoder_golden.py --source transformers
"""
import argparse
import json
import os
import shutil

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
# Independent plain-PyTorch forward (HF eager semantics).


def rms_norm(x, weight, eps):
    # HF LlamaRMSNorm: statistics in fp32, x * rsqrt(mean(x^2) + eps), then weight * x.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def plain_forward(spec, w, input_ids, attention_mask):
    bsz, seq = input_ids.shape
    d, hd = spec["hidden_size"], head_dim(spec)
    nq, nkv = spec["num_attention_heads"], spec["num_key_value_heads"]
    eps = spec["rms_norm_eps"]

    # HF forward without explicit position_ids uses positions 0..T-1 for every row. With right
    # padding these equal cumsum(attention_mask) - 1 at every real token, which is what meft uses.
    positions = torch.arange(seq, dtype=torch.float32)[None, :].expand(bsz, seq)
    # RoPE over the full head dim: inv_freq_i = 1 / theta^(2i / d); linear scaling divides the
    # positions (equivalently inv_freq) by the factor.
    inv_freq = 1.0 / (spec["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if spec["rope_scaling_factor"]:
        inv_freq = inv_freq / spec["rope_scaling_factor"]
    freqs = positions[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, hd]

    # Additive mask [B, 1, T, T]: causal, padded keys removed, optional sliding window.
    # Sliding window as in current HF (masking_utils.sliding_window_overlay:
    # `kv_idx > q_idx - sliding_window`): query i sees key j iff j <= i and i - j < window,
    # i.e. itself and the window - 1 keys before it. (HF 4.38-4.47's _make_causal_mask allowed
    # i - j <= window instead; the transformers run of this script exposes such a difference.)
    q_idx = torch.arange(seq)[:, None]
    k_idx = torch.arange(seq)[None, :]
    allowed = k_idx <= q_idx
    if spec["sliding_window"]:
        allowed = allowed & (q_idx - k_idx < spec["sliding_window"])
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(bsz, 1, seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min)

    h = w["model.embed_tokens.weight"][input_ids]
    for i in range(spec["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(bsz, seq, nq, hd).transpose(1, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(bsz, seq, nkv, hd).transpose(1, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(bsz, seq, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # repeat_kv: query head n uses key/value head n // (nq / nkv).
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) * hd ** -0.5 + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attn = (probs @ v).transpose(1, 2).reshape(bsz, seq, nq * hd)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        up = x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate * up) @ w[p + "mlp.down_proj.weight"].T
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if spec["tie_word_embeddings"] else w["lm_head.weight"]
    return (h @ head.T).float()


def plain_config(spec):
    """config.json as transformers 4.x writes it for these models."""
    cfg = {
        "architectures": spec["architectures"],
        "model_type": spec["model_type"],
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": head_dim(spec),
        "hidden_act": "silu",
        "rms_norm_eps": spec["rms_norm_eps"],
        "rope_theta": spec["rope_theta"],
        "rope_scaling": None,
        "max_position_embeddings": spec["max_position_embeddings"],
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if spec["model_type"] == "llama":
        cfg["mlp_bias"] = False
        cfg["pretraining_tp"] = 1
    else:
        cfg["sliding_window"] = spec["sliding_window"]
    if spec["rope_scaling_factor"]:
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear",
                               "factor": spec["rope_scaling_factor"]}
    return cfg


def save_safetensors(weights, path):
    # safetensors' own writer when available; otherwise a minimal writer for fp32 tensors.
    try:
        from safetensors.torch import save_file
        save_file({k: t.contiguous() for k, t in weights.items()}, path,
                  metadata={"format": "pt"})
        return
    except ImportError:
        pass
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(weights):
        data = weights[name].contiguous().to(torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(weights[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)


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


def write_model(out_root, source, name, spec):
    out = os.path.join(out_root, source, name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    weights = make_weights(spec)
    ids, mask = make_inputs(spec)
    plain = plain_forward(spec, weights, ids, mask)
    if source == "transformers":
        model, version = build_hf_model(spec, weights)
        model.save_pretrained(out, safe_serialization=True)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(out, extra)):
                os.remove(os.path.join(out, extra))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        label = f"transformers {version} {type(model).__name__} (eager attention)"
        real = mask.bool()
        diff = (logits - plain).abs()[real].max().item()
        print(f"{name}: max |transformers - plain-torch| at real positions = {diff:.3g}")
    else:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(plain_config(spec), f, indent=2)
            f.write("\n")
        save_safetensors(weights, os.path.join(out, "model.safetensors"))
        logits = plain
        label = "interim: plain PyTorch reference, not transformers"
    golden = {
        "source": label,
        "input_ids": ids.tolist(),
        "attention_mask": mask.tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(f"{x:.9g}") for x in logits.flatten().tolist()],
    }
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {out}")


def main():
    try:
        import transformers  # noqa: F401
        default = "transformers"
    except ImportError:
        default = "plain-torch"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=["transformers", "plain-torch"], default=default)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for name, spec in MODELS.items():
        write_model(args.out, args.source, name, spec)


if __name__ == "__main__":
    main()
